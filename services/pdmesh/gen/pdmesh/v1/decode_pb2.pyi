from pdmesh.gen.pdmesh.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "prefill_address", "fallback_prefill_addresses", "output_offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_PREFILL_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _worker_pb2.SamplingParams
    prefill_address: str
    fallback_prefill_addresses: _containers.RepeatedScalarFieldContainer[str]
    output_offset: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_worker_pb2.SamplingParams, _Mapping]] = ..., prefill_address: _Optional[str] = ..., fallback_prefill_addresses: _Optional[_Iterable[str]] = ..., output_offset: _Optional[int] = ...) -> None: ...

class DecodeChunk(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "prefill")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    prefill: PrefillInfo
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., prefill: _Optional[_Union[PrefillInfo, _Mapping]] = ...) -> None: ...

class PrefillInfo(_message.Message):
    __slots__ = ("mode", "handoff_bytes", "handoff_seconds", "prefill_seconds", "prefill_worker_id", "prefill_fallbacks", "kv_recomputes")
    MODE_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_BYTES_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    KV_RECOMPUTES_FIELD_NUMBER: _ClassVar[int]
    mode: str
    handoff_bytes: int
    handoff_seconds: float
    prefill_seconds: float
    prefill_worker_id: str
    prefill_fallbacks: int
    kv_recomputes: int
    def __init__(self, mode: _Optional[str] = ..., handoff_bytes: _Optional[int] = ..., handoff_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., prefill_worker_id: _Optional[str] = ..., prefill_fallbacks: _Optional[int] = ..., kv_recomputes: _Optional[int] = ...) -> None: ...
