from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    F32: _ClassVar[DType]
    F16: _ClassVar[DType]
    BF16: _ClassVar[DType]
    I32: _ClassVar[DType]
    I64: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    U8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
F32: DType
F16: DType
BF16: DType
I32: DType
I64: DType
BOOL: DType
U8: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TopK(_message.Message):
    __slots__ = ("ids", "logprobs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ids: Tensor
    logprobs: Tensor
    def __init__(self, ids: _Optional[_Union[Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class TreeStep(_message.Message):
    __slots__ = ("trunk_pos", "tokens", "parents", "accepted", "target_nodes", "target")
    TRUNK_POS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TARGET_NODES_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    trunk_pos: int
    tokens: Tensor
    parents: Tensor
    accepted: Tensor
    target_nodes: Tensor
    target: TopK
    def __init__(self, trunk_pos: _Optional[int] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ..., parents: _Optional[_Union[Tensor, _Mapping]] = ..., accepted: _Optional[_Union[Tensor, _Mapping]] = ..., target_nodes: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[TopK, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("start_unix_s", "end_unix_s", "target_forwards")
    START_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    start_unix_s: float
    end_unix_s: float
    target_forwards: int
    def __init__(self, start_unix_s: _Optional[float] = ..., end_unix_s: _Optional[float] = ..., target_forwards: _Optional[int] = ...) -> None: ...

class RequestTrace(_message.Message):
    __slots__ = ("request_id", "draft_version", "domain", "timing", "tokens", "prompt_len", "aux_hidden", "target", "steps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    AUX_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    draft_version: int
    domain: str
    timing: Timing
    tokens: Tensor
    prompt_len: int
    aux_hidden: Tensor
    target: TopK
    steps: _containers.RepeatedCompositeFieldContainer[TreeStep]
    def __init__(self, request_id: _Optional[str] = ..., draft_version: _Optional[int] = ..., domain: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., tokens: _Optional[_Union[Tensor, _Mapping]] = ..., prompt_len: _Optional[int] = ..., aux_hidden: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[TopK, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[TreeStep, _Mapping]]] = ...) -> None: ...

class TraceChunk(_message.Message):
    __slots__ = ("request_id", "chunk_index", "chunk_count", "payload", "total_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk_index: int
    chunk_count: int
    payload: bytes
    total_bytes: int
    def __init__(self, request_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ..., payload: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("request_id", "code", "message", "seq", "retry_after_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: int
    message: str
    seq: int
    retry_after_ms: int
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., seq: _Optional[int] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("serving", "version")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    version: str
    def __init__(self, serving: _Optional[bool] = ..., version: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("accepted", "rejected", "backpressured", "buffered", "buffered_bytes", "consumed", "evicted_stale", "spool_bytes")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    BACKPRESSURED_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_FIELD_NUMBER: _ClassVar[int]
    BUFFERED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_STALE_FIELD_NUMBER: _ClassVar[int]
    SPOOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: int
    backpressured: int
    buffered: int
    buffered_bytes: int
    consumed: int
    evicted_stale: int
    spool_bytes: int
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., backpressured: _Optional[int] = ..., buffered: _Optional[int] = ..., buffered_bytes: _Optional[int] = ..., consumed: _Optional[int] = ..., evicted_stale: _Optional[int] = ..., spool_bytes: _Optional[int] = ...) -> None: ...

class WeightTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "transposed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TRANSPOSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    transposed: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., transposed: _Optional[bool] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("version", "index", "count", "tensors", "total_bytes", "offset", "data", "draft_config", "xxh64", "digest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DRAFT_CONFIG_FIELD_NUMBER: _ClassVar[int]
    XXH64_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    version: int
    index: int
    count: int
    tensors: _containers.RepeatedCompositeFieldContainer[WeightTensor]
    total_bytes: int
    offset: int
    data: bytes
    draft_config: str
    xxh64: int
    digest: bytes
    def __init__(self, version: _Optional[int] = ..., index: _Optional[int] = ..., count: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[WeightTensor, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., draft_config: _Optional[str] = ..., xxh64: _Optional[int] = ..., digest: _Optional[bytes] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("have_version", "subscriber")
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBER_FIELD_NUMBER: _ClassVar[int]
    have_version: int
    subscriber: str
    def __init__(self, have_version: _Optional[int] = ..., subscriber: _Optional[str] = ...) -> None: ...
