"""The zimage-split SDK: `Client` (blocking) and `AsyncClient` (asyncio), with typed errors."""

from zimage_split.client.aio import AsyncClient, Latents
from zimage_split.client.batch import ImageJob, JobResult
from zimage_split.client.embeddings import Embeddings, PromptEmbedding
from zimage_split.client.sync import Client
from zimage_split.client.tensor_bytes import TensorBytes
from zimage_split.common.errors import (
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    ZSplitError,
)
from zimage_split.common.security import ClientSecurity

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Client",
    "ClientSecurity",
    "DataLoss",
    "DeadlineExceeded",
    "Embeddings",
    "FailedPrecondition",
    "ImageJob",
    "Internal",
    "InvalidArgument",
    "JobResult",
    "Latents",
    "NotFound",
    "PermissionDenied",
    "PromptEmbedding",
    "ResourceExhausted",
    "TensorBytes",
    "Unauthenticated",
    "Unavailable",
    "ZSplitError",
]
