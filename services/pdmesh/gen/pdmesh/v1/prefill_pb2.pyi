from pdmesh.gen.pdmesh.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OpenKVChannelRequest(_message.Message):
    __slots__ = ("decode_worker_id", "store_host", "store_port", "channel_id", "timeout_s", "layout")
    DECODE_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    decode_worker_id: str
    store_host: str
    store_port: int
    channel_id: str
    timeout_s: float
    layout: _worker_pb2.KVLayout
    def __init__(self, decode_worker_id: _Optional[str] = ..., store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., channel_id: _Optional[str] = ..., timeout_s: _Optional[float] = ..., layout: _Optional[_Union[_worker_pb2.KVLayout, _Mapping]] = ...) -> None: ...

class OpenKVChannelResponse(_message.Message):
    __slots__ = ("layout", "backend")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    layout: _worker_pb2.KVLayout
    backend: str
    def __init__(self, layout: _Optional[_Union[_worker_pb2.KVLayout, _Mapping]] = ..., backend: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "layout", "output_offset", "kv_start")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    KV_START_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _worker_pb2.SamplingParams
    layout: _worker_pb2.KVLayout
    output_offset: int
    kv_start: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_worker_pb2.SamplingParams, _Mapping]] = ..., layout: _Optional[_Union[_worker_pb2.KVLayout, _Mapping]] = ..., output_offset: _Optional[int] = ..., kv_start: _Optional[int] = ...) -> None: ...

class PrefillResult(_message.Message):
    __slots__ = ("first_token", "finish_reason", "num_tokens", "layout", "prefill_seconds", "worker_id", "kv_transfer_params", "kv_start")
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    KV_START_FIELD_NUMBER: _ClassVar[int]
    first_token: int
    finish_reason: str
    num_tokens: int
    layout: _worker_pb2.KVLayout
    prefill_seconds: float
    worker_id: str
    kv_transfer_params: str
    kv_start: int
    def __init__(self, first_token: _Optional[int] = ..., finish_reason: _Optional[str] = ..., num_tokens: _Optional[int] = ..., layout: _Optional[_Union[_worker_pb2.KVLayout, _Mapping]] = ..., prefill_seconds: _Optional[float] = ..., worker_id: _Optional[str] = ..., kv_transfer_params: _Optional[str] = ..., kv_start: _Optional[int] = ...) -> None: ...

class PullKVRequest(_message.Message):
    __slots__ = ("request_id", "channel_id", "tag")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    channel_id: str
    tag: int
    def __init__(self, request_id: _Optional[str] = ..., channel_id: _Optional[str] = ..., tag: _Optional[int] = ...) -> None: ...

class TransferDone(_message.Message):
    __slots__ = ("bytes", "seconds", "checksum", "checksum_kind")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_KIND_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    seconds: float
    checksum: int
    checksum_kind: str
    def __init__(self, bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., checksum: _Optional[int] = ..., checksum_kind: _Optional[str] = ...) -> None: ...

class ReleaseKVRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseKVResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
