"""tools/gen_protos.py: import rewriting, generated package layout, and the --check drift gate."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "gen_check"


def run_check(gen_protos, proto_root, out) -> int:
    return gen_protos.main(
        ["--check", "--proto-root", str(proto_root), "--out", str(out), "--package", PACKAGE]
    )


@pytest.fixture
def generated(gen_protos, test_protos, tmp_path):
    """A freshly generated copy, safe to edit."""
    out = tmp_path / PACKAGE
    gen_protos.generate(test_protos, out, PACKAGE)
    return out


def test_rewrite_touches_only_generated_modules(gen_protos):
    source = (
        "from pdmesh.v1 import worker_pb2 as pdmesh_dot_v1_dot_worker__pb2\n"
        "from google.protobuf import duration_pb2 as _duration_pb2\n"
        "from google.rpc import status_pb2 as google_dot_rpc_dot_status__pb2\n"
        "from pdmesh.v1 import unrelated\n"
        "import top_pb2 as top__pb2\n"
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'pdmesh.v1.worker_pb2', _globals)\n"
    )
    generated = {"pdmesh.v1.worker_pb2", "top_pb2"}
    assert gen_protos.rewrite_imports(source, generated, "pdmesh.gen").splitlines() == [
        "from pdmesh.gen.pdmesh.v1 import worker_pb2 as pdmesh_dot_v1_dot_worker__pb2",
        "from google.protobuf import duration_pb2 as _duration_pb2",
        "from google.rpc import status_pb2 as google_dot_rpc_dot_status__pb2",
        "from pdmesh.v1 import unrelated",
        "import pdmesh.gen.top_pb2 as top__pb2",
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'pdmesh.gen.pdmesh.v1.worker_pb2', _globals)",
    ]


def test_generated_package_imports_under_its_own_name(pb):
    assert pb.echo_pb2.__name__ == "rpc_testgen.pdmeshtest.v1.echo_pb2"
    assert pb.echo_pb2.GenerateChunk.__module__ == pb.echo_pb2.__name__
    assert pb.echo_pb2.GenerateChunk(usage={"prompt_tokens": 3}).usage.prompt_tokens == 3
    assert "pdmeshtest" not in sys.modules  # nothing imported the un-rewritten name
    assert pb.echo_pb2.DESCRIPTOR.name == "pdmeshtest/v1/echo.proto"  # what reflection serves


def test_layout_has_stubs_types_and_init_files(generated):
    files = {p.relative_to(generated).as_posix() for p in generated.rglob("*") if p.is_file()}
    assert files == {
        "__init__.py",
        "pdmeshtest/__init__.py",
        "pdmeshtest/v1/__init__.py",
        *(f"pdmeshtest/v1/{stem}{suffix}" for stem in ("common", "echo")
          for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")),
    }


def test_check_passes_on_fresh_output(gen_protos, test_protos, generated, capsys):
    assert run_check(gen_protos, test_protos, generated) == 0
    assert "up to date" in capsys.readouterr().out


def test_check_fails_after_editing_a_generated_file(gen_protos, test_protos, generated, capsys):
    target = generated / "pdmeshtest" / "v1" / "echo_pb2.py"
    target.write_text(target.read_text() + "# hand edit\n")
    assert run_check(gen_protos, test_protos, generated) == 1
    err = capsys.readouterr().err
    assert "differs: pdmeshtest/v1/echo_pb2.py" in err
    assert "-# hand edit" in err


def test_check_fails_on_missing_and_extra_files(gen_protos, test_protos, generated, capsys):
    (generated / "pdmeshtest" / "v1" / "common_pb2.pyi").unlink()
    (generated / "pdmeshtest" / "v1" / "gone_pb2.py").write_text("")
    assert run_check(gen_protos, test_protos, generated) == 1
    err = capsys.readouterr().err
    assert "missing: pdmeshtest/v1/common_pb2.pyi" in err
    assert "extra: pdmeshtest/v1/gone_pb2.py" in err


def test_write_replaces_stale_output(gen_protos, test_protos, generated):
    (generated / "pdmeshtest" / "v1" / "gone_pb2.py").write_text("")
    args = ["--proto-root", str(test_protos), "--out", str(generated), "--package", PACKAGE]
    assert gen_protos.main(args) == 0
    assert not (generated / "pdmeshtest" / "v1" / "gone_pb2.py").exists()
    assert run_check(gen_protos, test_protos, generated) == 0


def test_protoc_error_is_reported(gen_protos, tmp_path):
    (tmp_path / "protos").mkdir()
    (tmp_path / "protos" / "bad.proto").write_text('syntax = "proto3";\nmessage {')
    with pytest.raises(RuntimeError, match="bad.proto"):
        gen_protos.generate(tmp_path / "protos", tmp_path / "out", PACKAGE)


def test_committed_code_matches_protos(gen_protos, tmp_path):
    """The CI drift gate on the real tree (in a copy, so a failure changes nothing)."""
    shutil.copytree(REPO_ROOT / "services" / "pdmesh" / "gen", tmp_path / "gen",
                    ignore=shutil.ignore_patterns("__pycache__"))
    args = ["--check", "--proto-root", str(REPO_ROOT / "protos"), "--out", str(tmp_path / "gen")]
    assert gen_protos.main(args) == 0, "run: python tools/gen_protos.py"
