from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProtocolVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_VERSION_UNSPECIFIED: _ClassVar[ProtocolVersion]
    PROTOCOL_VERSION_CURRENT: _ClassVar[ProtocolVersion]
PROTOCOL_VERSION_UNSPECIFIED: ProtocolVersion
PROTOCOL_VERSION_CURRENT: ProtocolVersion

class ParameterInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "protocol_version", "parameters", "client_name", "resume_round", "rejoin")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    RESUME_ROUND_FIELD_NUMBER: _ClassVar[int]
    REJOIN_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    protocol_version: int
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterInfo]
    client_name: str
    resume_round: int
    rejoin: bool
    def __init__(self, client_id: _Optional[int] = ..., protocol_version: _Optional[int] = ..., parameters: _Optional[_Iterable[_Union[ParameterInfo, _Mapping]]] = ..., client_name: _Optional[str] = ..., resume_round: _Optional[int] = ..., rejoin: _Optional[bool] = ...) -> None: ...

class JoinHeader(_message.Message):
    __slots__ = ("client_id", "session", "protocol_version", "config", "workers", "rounds", "next_round", "frame_lengths", "resync", "estimator_frame_lengths", "submitted", "register", "idle", "shard_index", "shard_count", "shard_layers", "pipeline")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    FRAME_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FRAME_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARD_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session: str
    protocol_version: int
    config: bytes
    workers: int
    rounds: int
    next_round: int
    frame_lengths: _containers.RepeatedScalarFieldContainer[int]
    resync: bool
    estimator_frame_lengths: _containers.RepeatedScalarFieldContainer[int]
    submitted: bool
    register: bool
    idle: bool
    shard_index: int
    shard_count: int
    shard_layers: _containers.RepeatedScalarFieldContainer[int]
    pipeline: bool
    def __init__(self, client_id: _Optional[int] = ..., session: _Optional[str] = ..., protocol_version: _Optional[int] = ..., config: _Optional[bytes] = ..., workers: _Optional[int] = ..., rounds: _Optional[int] = ..., next_round: _Optional[int] = ..., frame_lengths: _Optional[_Iterable[int]] = ..., resync: _Optional[bool] = ..., estimator_frame_lengths: _Optional[_Iterable[int]] = ..., submitted: _Optional[bool] = ..., register: _Optional[bool] = ..., idle: _Optional[bool] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., shard_layers: _Optional[_Iterable[int]] = ..., pipeline: _Optional[bool] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: JoinHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[JoinHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class WireReport(_message.Message):
    __slots__ = ("exchange", "up", "down")
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    exchange: int
    up: int
    down: int
    def __init__(self, exchange: _Optional[int] = ..., up: _Optional[int] = ..., down: _Optional[int] = ...) -> None: ...

class SubmissionHeader(_message.Message):
    __slots__ = ("client_id", "session", "round", "frame_lengths", "train_loss", "previous", "idle", "init", "frame_order")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FRAME_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    FRAME_ORDER_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session: str
    round: int
    frame_lengths: _containers.RepeatedScalarFieldContainer[int]
    train_loss: float
    previous: WireReport
    idle: bool
    init: bool
    frame_order: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, client_id: _Optional[int] = ..., session: _Optional[str] = ..., round: _Optional[int] = ..., frame_lengths: _Optional[_Iterable[int]] = ..., train_loss: _Optional[float] = ..., previous: _Optional[_Union[WireReport, _Mapping]] = ..., idle: _Optional[bool] = ..., init: _Optional[bool] = ..., frame_order: _Optional[_Iterable[int]] = ...) -> None: ...

class Submission(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: SubmissionHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[SubmissionHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class DownlinkHeader(_message.Message):
    __slots__ = ("round", "done", "duplicate", "frame_lengths", "resync", "wait", "late", "catchup_frame_lengths", "catchup_full", "catchup_from")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    FRAME_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    LATE_FIELD_NUMBER: _ClassVar[int]
    CATCHUP_FRAME_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    CATCHUP_FULL_FIELD_NUMBER: _ClassVar[int]
    CATCHUP_FROM_FIELD_NUMBER: _ClassVar[int]
    round: int
    done: bool
    duplicate: bool
    frame_lengths: _containers.RepeatedScalarFieldContainer[int]
    resync: bool
    wait: bool
    late: bool
    catchup_frame_lengths: _containers.RepeatedScalarFieldContainer[int]
    catchup_full: bool
    catchup_from: int
    def __init__(self, round: _Optional[int] = ..., done: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., frame_lengths: _Optional[_Iterable[int]] = ..., resync: _Optional[bool] = ..., wait: _Optional[bool] = ..., late: _Optional[bool] = ..., catchup_frame_lengths: _Optional[_Iterable[int]] = ..., catchup_full: _Optional[bool] = ..., catchup_from: _Optional[int] = ...) -> None: ...

class Downlink(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DownlinkHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[DownlinkHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("client_id", "session", "last", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session: str
    last: WireReport
    reason: str
    def __init__(self, client_id: _Optional[int] = ..., session: _Optional[str] = ..., last: _Optional[_Union[WireReport, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("state", "protocol_version", "round", "rounds", "workers", "joined", "submitted", "phase", "config", "parameters", "loss_w", "loss_x", "uptime_seconds", "rejected", "nonfinite_zeroed", "checkpoint_round", "rss_bytes", "partial_rounds", "shard_index", "shard_count", "shard_layers")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[StatusReply.State]
        STATE_WAITING: _ClassVar[StatusReply.State]
        STATE_RUNNING: _ClassVar[StatusReply.State]
        STATE_FINISHED: _ClassVar[StatusReply.State]
        STATE_STOPPING: _ClassVar[StatusReply.State]
    STATE_UNSPECIFIED: StatusReply.State
    STATE_WAITING: StatusReply.State
    STATE_RUNNING: StatusReply.State
    STATE_FINISHED: StatusReply.State
    STATE_STOPPING: StatusReply.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LOSS_W_FIELD_NUMBER: _ClassVar[int]
    LOSS_X_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_ZEROED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ROUND_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARD_LAYERS_FIELD_NUMBER: _ClassVar[int]
    state: StatusReply.State
    protocol_version: int
    round: int
    rounds: int
    workers: int
    joined: _containers.RepeatedScalarFieldContainer[int]
    submitted: _containers.RepeatedScalarFieldContainer[int]
    phase: str
    config: bytes
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterInfo]
    loss_w: float
    loss_x: float
    uptime_seconds: float
    rejected: int
    nonfinite_zeroed: int
    checkpoint_round: int
    rss_bytes: int
    partial_rounds: int
    shard_index: int
    shard_count: int
    shard_layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, state: _Optional[_Union[StatusReply.State, str]] = ..., protocol_version: _Optional[int] = ..., round: _Optional[int] = ..., rounds: _Optional[int] = ..., workers: _Optional[int] = ..., joined: _Optional[_Iterable[int]] = ..., submitted: _Optional[_Iterable[int]] = ..., phase: _Optional[str] = ..., config: _Optional[bytes] = ..., parameters: _Optional[_Iterable[_Union[ParameterInfo, _Mapping]]] = ..., loss_w: _Optional[float] = ..., loss_x: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., rejected: _Optional[int] = ..., nonfinite_zeroed: _Optional[int] = ..., checkpoint_round: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., partial_rounds: _Optional[int] = ..., shard_index: _Optional[int] = ..., shard_count: _Optional[int] = ..., shard_layers: _Optional[_Iterable[int]] = ...) -> None: ...
