"""The zimage-split SDK: `Client` (blocking) and `AsyncClient` (asyncio), with typed errors."""

from zimage_split.client.aio import AsyncClient, Latents
from zimage_split.client.batch import ImageJob, JobResult
from zimage_split.client.embeddings import Embeddings, PromptEmbedding
from zimage_split.client.sync import Client
from zimage_split.common.errors import (
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
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
    "ImageJob",
    "Internal",
    "InvalidArgument",
    "JobResult",
    "Latents",
    "NotFound",
    "PromptEmbedding",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "ZSplitError",
]
