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

class OutputFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_FORMAT_UNSPECIFIED: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_PNG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_JPEG: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_WEBP: _ClassVar[OutputFormat]
    OUTPUT_FORMAT_LATENT: _ClassVar[OutputFormat]
LONG_PROMPT_MODE_UNSPECIFIED: LongPromptMode
LONG_PROMPT_MODE_TRUNCATE: LongPromptMode
LONG_PROMPT_MODE_INTERPOLATE: LongPromptMode
LONG_PROMPT_MODE_POOL: LongPromptMode
OUTPUT_FORMAT_UNSPECIFIED: OutputFormat
OUTPUT_FORMAT_PNG: OutputFormat
OUTPUT_FORMAT_JPEG: OutputFormat
OUTPUT_FORMAT_WEBP: OutputFormat
OUTPUT_FORMAT_LATENT: OutputFormat

class Conditioning(_message.Message):
    __slots__ = ("text", "embedding_key")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    text: str
    embedding_key: str
    def __init__(self, text: _Optional[str] = ..., embedding_key: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale", "cfg_normalization", "cfg_truncation", "model", "max_sequence_length", "num_images", "loras", "init_image", "long_prompt_mode", "output_format", "quality", "strip_metadata", "shift", "skip_layer_guidance", "passes", "return_intermediate", "dype", "controlnet")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    CFG_NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    CFG_TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    LONG_PROMPT_MODE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    STRIP_METADATA_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    SKIP_LAYER_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    PASSES_FIELD_NUMBER: _ClassVar[int]
    RETURN_INTERMEDIATE_FIELD_NUMBER: _ClassVar[int]
    DYPE_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: Conditioning
    negative_prompt: Conditioning
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    cfg_normalization: float
    cfg_truncation: float
    model: str
    max_sequence_length: int
    num_images: int
    loras: _containers.RepeatedCompositeFieldContainer[LoraRequest]
    init_image: InitImage
    long_prompt_mode: LongPromptMode
    output_format: OutputFormat
    quality: int
    strip_metadata: bool
    shift: float
    skip_layer_guidance: SkipLayerGuidance
    passes: _containers.RepeatedCompositeFieldContainer[Pass]
    return_intermediate: bool
    dype: Dype
    controlnet: ControlNetRequest
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[_Union[Conditioning, _Mapping]] = ..., negative_prompt: _Optional[_Union[Conditioning, _Mapping]] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., cfg_normalization: _Optional[float] = ..., cfg_truncation: _Optional[float] = ..., model: _Optional[str] = ..., max_sequence_length: _Optional[int] = ..., num_images: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[LoraRequest, _Mapping]]] = ..., init_image: _Optional[_Union[InitImage, _Mapping]] = ..., long_prompt_mode: _Optional[_Union[LongPromptMode, str]] = ..., output_format: _Optional[_Union[OutputFormat, str]] = ..., quality: _Optional[int] = ..., strip_metadata: _Optional[bool] = ..., shift: _Optional[float] = ..., skip_layer_guidance: _Optional[_Union[SkipLayerGuidance, _Mapping]] = ..., passes: _Optional[_Iterable[_Union[Pass, _Mapping]]] = ..., return_intermediate: _Optional[bool] = ..., dype: _Optional[_Union[Dype, _Mapping]] = ..., controlnet: _Optional[_Union[ControlNetRequest, _Mapping]] = ...) -> None: ...

class Dype(_message.Message):
    __slots__ = ("method", "scale", "exponent")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    EXPONENT_FIELD_NUMBER: _ClassVar[int]
    method: str
    scale: float
    exponent: float
    def __init__(self, method: _Optional[str] = ..., scale: _Optional[float] = ..., exponent: _Optional[float] = ...) -> None: ...

class ControlNetRequest(_message.Message):
    __slots__ = ("name", "image_key", "conditioning_scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    image_key: str
    conditioning_scale: float
    def __init__(self, name: _Optional[str] = ..., image_key: _Optional[str] = ..., conditioning_scale: _Optional[float] = ...) -> None: ...

class Pass(_message.Message):
    __slots__ = ("scale", "steps", "strength")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    scale: float
    steps: int
    strength: float
    def __init__(self, scale: _Optional[float] = ..., steps: _Optional[int] = ..., strength: _Optional[float] = ...) -> None: ...

class SkipLayerGuidance(_message.Message):
    __slots__ = ("scale", "layers", "start", "stop")
    SCALE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    scale: float
    layers: _containers.RepeatedScalarFieldContainer[int]
    start: float
    stop: float
    def __init__(self, scale: _Optional[float] = ..., layers: _Optional[_Iterable[int]] = ..., start: _Optional[float] = ..., stop: _Optional[float] = ...) -> None: ...

class LoraRequest(_message.Message):
    __slots__ = ("name", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: float
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class InitImage(_message.Message):
    __slots__ = ("image_key", "strength", "mask_key")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    strength: float
    mask_key: str
    def __init__(self, image_key: _Optional[str] = ..., strength: _Optional[float] = ..., mask_key: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps", "elapsed_seconds", "replica")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    elapsed_seconds: float
    replica: str
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., replica: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_seconds", "encode_seconds", "denoise_seconds", "decode_seconds", "total_seconds")
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    queue_seconds: float
    encode_seconds: float
    denoise_seconds: float
    decode_seconds: float
    total_seconds: float
    def __init__(self, queue_seconds: _Optional[float] = ..., encode_seconds: _Optional[float] = ..., denoise_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class ImageHeader(_message.Message):
    __slots__ = ("request_id", "seed", "width", "height", "steps", "guidance_scale", "format", "byte_length", "sha256", "timings", "model_id", "replica", "prompt_key", "negative_prompt_key", "batch_size", "image_index", "vae_tiled", "loras", "prompt_token_count", "prompt_source_token_count", "prompt_shortened_by", "strength", "steps_run", "shift", "skip_layer_guidance", "pass_index", "pass_count", "dype", "controlnet")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    PROMPT_KEY_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_KEY_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    VAE_TILED_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SOURCE_TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SHORTENED_BY_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    STEPS_RUN_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FIELD_NUMBER: _ClassVar[int]
    SKIP_LAYER_GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    PASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    PASS_COUNT_FIELD_NUMBER: _ClassVar[int]
    DYPE_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    seed: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    format: str
    byte_length: int
    sha256: str
    timings: Timings
    model_id: str
    replica: str
    prompt_key: str
    negative_prompt_key: str
    batch_size: int
    image_index: int
    vae_tiled: bool
    loras: _containers.RepeatedCompositeFieldContainer[LoraRequest]
    prompt_token_count: int
    prompt_source_token_count: int
    prompt_shortened_by: LongPromptMode
    strength: float
    steps_run: int
    shift: float
    skip_layer_guidance: SkipLayerGuidance
    pass_index: int
    pass_count: int
    dype: Dype
    controlnet: ControlNetRequest
    def __init__(self, request_id: _Optional[str] = ..., seed: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., format: _Optional[str] = ..., byte_length: _Optional[int] = ..., sha256: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., model_id: _Optional[str] = ..., replica: _Optional[str] = ..., prompt_key: _Optional[str] = ..., negative_prompt_key: _Optional[str] = ..., batch_size: _Optional[int] = ..., image_index: _Optional[int] = ..., vae_tiled: _Optional[bool] = ..., loras: _Optional[_Iterable[_Union[LoraRequest, _Mapping]]] = ..., prompt_token_count: _Optional[int] = ..., prompt_source_token_count: _Optional[int] = ..., prompt_shortened_by: _Optional[_Union[LongPromptMode, str]] = ..., strength: _Optional[float] = ..., steps_run: _Optional[int] = ..., shift: _Optional[float] = ..., skip_layer_guidance: _Optional[_Union[SkipLayerGuidance, _Mapping]] = ..., pass_index: _Optional[int] = ..., pass_count: _Optional[int] = ..., dype: _Optional[_Union[Dype, _Mapping]] = ..., controlnet: _Optional[_Union[ControlNetRequest, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("progress", "image", "image_chunk")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    image: ImageHeader
    image_chunk: bytes
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., image: _Optional[_Union[ImageHeader, _Mapping]] = ..., image_chunk: _Optional[bytes] = ...) -> None: ...

class UploadImageHeader(_message.Message):
    __slots__ = ("byte_length", "sha256", "mask")
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    byte_length: int
    sha256: str
    mask: bool
    def __init__(self, byte_length: _Optional[int] = ..., sha256: _Optional[str] = ..., mask: _Optional[bool] = ...) -> None: ...

class UploadImageRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadImageHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadImageHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadImageResponse(_message.Message):
    __slots__ = ("image_key", "width", "height")
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    image_key: str
    width: int
    height: int
    def __init__(self, image_key: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ListLorasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoraFile(_message.Message):
    __slots__ = ("name", "byte_length", "format", "rank", "module_count", "loaded", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MODULE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    byte_length: int
    format: str
    rank: int
    module_count: int
    loaded: bool
    error: str
    def __init__(self, name: _Optional[str] = ..., byte_length: _Optional[int] = ..., format: _Optional[str] = ..., rank: _Optional[int] = ..., module_count: _Optional[int] = ..., loaded: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ListLorasResponse(_message.Message):
    __slots__ = ("loras", "enabled")
    LORAS_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[LoraFile]
    enabled: bool
    def __init__(self, loras: _Optional[_Iterable[_Union[LoraFile, _Mapping]]] = ..., enabled: _Optional[bool] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("tensor", "content_key")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    CONTENT_KEY_FIELD_NUMBER: _ClassVar[int]
    tensor: _tensor_pb2.TensorHeader
    content_key: str
    def __init__(self, tensor: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., content_key: _Optional[str] = ...) -> None: ...

class UploadEmbeddingRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadEmbeddingResponse(_message.Message):
    __slots__ = ("embedding_key",)
    EMBEDDING_KEY_FIELD_NUMBER: _ClassVar[int]
    embedding_key: str
    def __init__(self, embedding_key: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "caption_dim", "dtype", "device", "encoder_address", "parameter_count", "components", "max_pixels", "max_steps", "embedding_cache_hits", "embedding_cache_misses", "embedding_cache_bytes", "max_images_per_request", "attention_backend", "compiled", "vae_tiling", "max_sequence_length_limit", "loras_enabled", "lora_cache_size", "dtype_reason", "default_shift", "dit_layers", "controlnets", "replicas", "replica_start_failures")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTION_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ENCODER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    VAE_TILING_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LORAS_ENABLED_FIELD_NUMBER: _ClassVar[int]
    LORA_CACHE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_REASON_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SHIFT_FIELD_NUMBER: _ClassVar[int]
    DIT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_START_FAILURES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    caption_dim: int
    dtype: _tensor_pb2.DType
    device: str
    encoder_address: str
    parameter_count: int
    components: _containers.RepeatedScalarFieldContainer[str]
    max_pixels: int
    max_steps: int
    embedding_cache_hits: int
    embedding_cache_misses: int
    embedding_cache_bytes: int
    max_images_per_request: int
    attention_backend: str
    compiled: bool
    vae_tiling: str
    max_sequence_length_limit: int
    loras_enabled: bool
    lora_cache_size: int
    dtype_reason: str
    default_shift: float
    dit_layers: int
    controlnets: _containers.RepeatedCompositeFieldContainer[ControlNetInfo]
    replicas: int
    replica_start_failures: int
    def __init__(self, model_id: _Optional[str] = ..., caption_dim: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., device: _Optional[str] = ..., encoder_address: _Optional[str] = ..., parameter_count: _Optional[int] = ..., components: _Optional[_Iterable[str]] = ..., max_pixels: _Optional[int] = ..., max_steps: _Optional[int] = ..., embedding_cache_hits: _Optional[int] = ..., embedding_cache_misses: _Optional[int] = ..., embedding_cache_bytes: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., attention_backend: _Optional[str] = ..., compiled: _Optional[bool] = ..., vae_tiling: _Optional[str] = ..., max_sequence_length_limit: _Optional[int] = ..., loras_enabled: _Optional[bool] = ..., lora_cache_size: _Optional[int] = ..., dtype_reason: _Optional[str] = ..., default_shift: _Optional[float] = ..., dit_layers: _Optional[int] = ..., controlnets: _Optional[_Iterable[_Union[ControlNetInfo, _Mapping]]] = ..., replicas: _Optional[int] = ..., replica_start_failures: _Optional[int] = ...) -> None: ...

class ControlNetInfo(_message.Message):
    __slots__ = ("name", "takes_mask", "control_layers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAKES_MASK_FIELD_NUMBER: _ClassVar[int]
    CONTROL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    takes_mask: bool
    control_layers: int
    def __init__(self, name: _Optional[str] = ..., takes_mask: _Optional[bool] = ..., control_layers: _Optional[int] = ...) -> None: ...
