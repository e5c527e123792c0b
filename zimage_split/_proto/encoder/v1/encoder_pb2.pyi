from zimage_split._proto.tensor.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LongPromptMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LONG_PROMPT_MODE_UNSPECIFIED: _ClassVar[LongPromptMode]
    LONG_PROMPT_MODE_TRUNCATE: _ClassVar[LongPromptMode]
    LONG_PROMPT_MODE_INTERPOLATE: _ClassVar[LongPromptMode]
    LONG_PROMPT_MODE_POOL: _ClassVar[LongPromptMode]
LONG_PROMPT_MODE_UNSPECIFIED: LongPromptMode
LONG_PROMPT_MODE_TRUNCATE: LongPromptMode
LONG_PROMPT_MODE_INTERPOLATE: LongPromptMode
LONG_PROMPT_MODE_POOL: LongPromptMode

class EncodeOptions(_message.Message):
    __slots__ = ("max_sequence_length", "hidden_layer", "long_prompt_mode")
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_LAYER_FIELD_NUMBER: _ClassVar[int]
    LONG_PROMPT_MODE_FIELD_NUMBER: _ClassVar[int]
    max_sequence_length: int
    hidden_layer: int
    long_prompt_mode: LongPromptMode
    def __init__(self, max_sequence_length: _Optional[int] = ..., hidden_layer: _Optional[int] = ..., long_prompt_mode: _Optional[_Union[LongPromptMode, str]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("prompts", "options")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    options: EncodeOptions
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., options: _Optional[_Union[EncodeOptions, _Mapping]] = ...) -> None: ...

class EmbeddingHeader(_message.Message):
    __slots__ = ("prompt_index", "content_key", "tensor", "token_count", "truncated", "cache_hit", "encode_seconds", "formatted_text", "hidden_layer", "max_sequence_length", "model_id", "source_token_count", "shortened_by")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONTENT_KEY_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORMATTED_TEXT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_LAYER_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHORTENED_BY_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    content_key: str
    tensor: _tensor_pb2.TensorHeader
    token_count: int
    truncated: bool
    cache_hit: bool
    encode_seconds: float
    formatted_text: str
    hidden_layer: int
    max_sequence_length: int
    model_id: str
    source_token_count: int
    shortened_by: LongPromptMode
    def __init__(self, prompt_index: _Optional[int] = ..., content_key: _Optional[str] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., token_count: _Optional[int] = ..., truncated: _Optional[bool] = ..., cache_hit: _Optional[bool] = ..., encode_seconds: _Optional[float] = ..., formatted_text: _Optional[str] = ..., hidden_layer: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., model_id: _Optional[str] = ..., source_token_count: _Optional[int] = ..., shortened_by: _Optional[_Union[LongPromptMode, str]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: EmbeddingHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[EmbeddingHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "hidden_size", "dtype", "hidden_layer", "max_sequence_length", "device", "layers_loaded", "cache_hits", "cache_misses", "prompts_encoded", "forward_passes", "parameter_count", "components", "max_sequence_length_limit", "dtype_reason", "quantization")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_LAYER_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_LOADED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_ENCODED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_REASON_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    hidden_size: int
    dtype: _tensor_pb2.DType
    hidden_layer: int
    max_sequence_length: int
    device: str
    layers_loaded: int
    cache_hits: int
    cache_misses: int
    prompts_encoded: int
    forward_passes: int
    parameter_count: int
    components: _containers.RepeatedScalarFieldContainer[str]
    max_sequence_length_limit: int
    dtype_reason: str
    quantization: str
    def __init__(self, model_id: _Optional[str] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., hidden_layer: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., device: _Optional[str] = ..., layers_loaded: _Optional[int] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., prompts_encoded: _Optional[int] = ..., forward_passes: _Optional[int] = ..., parameter_count: _Optional[int] = ..., components: _Optional[_Iterable[str]] = ..., max_sequence_length_limit: _Optional[int] = ..., dtype_reason: _Optional[str] = ..., quantization: _Optional[str] = ...) -> None: ...
