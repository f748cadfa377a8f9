"""What every transport of the embedding client shares: its error, and the batching
that finds the image to blame and learns the server's batch limit (serving/client.py
for REST, serving/grpc_client.py for gRPC). Standard library only.
"""

from __future__ import annotations

import sys

class ClientError(Exception):
    """The server rejected a request, or could not be reached after the retries.

    `status` is the HTTP status (None when the server was not reached); over gRPC it is
    the HTTP status TF Serving's REST API gives for the same error, and `code` is the gRPC
    status name ("INVALID_ARGUMENT"). `index` is the position of the image the server
    could not embed, when one image is to blame.
    """

    def __init__(self, message, status=None, index=None, code=None):
        super().__init__(message)
        self.status = status
        self.index = index
        self.code = code


# How TF Serving's batching refuses a request larger than its max_batch_size
# ("Task size 100 is larger than maximum input batch size 64").
_TOO_LARGE = ("larger than maximum input batch size", "max_batch_size")


class BaseEmbeddingClient:
    """What the commands need from a server, whatever the transport: batching, finding
    the image to blame, learning the server's batch limit. A transport subclass
    implements `_predict(batch)` (one request: a list of embeddings, or ClientError
    with the HTTP-equivalent `status`), `status()` (TF Serving's REST JSON of the model
    status) and `status_call` (what to name in an error about it).

    Args:
        model: the served model name.
        version: a specific model version, or None for the newest.
        batch_size: images per request.
        timeout: seconds per request.
        retries: extra attempts after a failure to connect, a timeout or an overloaded
            server, with exponential backoff starting at `backoff` seconds.
    """

    def __init__(self, model, version=None, batch_size=32, timeout=30.0, retries=3, backoff=0.5,
                 signature="serving_default"):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.version = version
        self.batch_size = batch_size
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.signature = signature

    def _predict(self, batch: list[bytes]) -> list[list[float]]:
        raise NotImplementedError

    def status(self) -> dict:
        raise NotImplementedError

    @property
    def status_call(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection, if the transport keeps one."""

    def embed(self, images: list[bytes]) -> list[list[float]]:
        """Embeddings of JPEG/PNG-encoded images, in order, in requests of `batch_size`.

        A server that refuses the request size (TF Serving with batching and a smaller
        max_batch_size) makes the client halve `batch_size` until it fits, and keep it.
        A request the server cannot run (an image that does not decode fails its whole
        request) is split until the image to blame is found: ClientError names its
        index.
        """
        return self._embed_all(images, failures=None)

    def embed_skipping_bad(self, images: list[bytes]) -> tuple[list[list[float] | None], dict[int, str]]:
        """As `embed`, but an image the server cannot embed does not stop the others.

        Returns (embeddings with None where an image failed, {index: server's message}).
        Errors that are not one image's fault (server unreachable, unknown model) still
        raise ClientError.
        """
        failures: dict[int, str] = {}
        return self._embed_all(images, failures), failures

    def _embed_all(self, images, failures):
        out = []
        start = 0
        while start < len(images):
            batch = images[start : start + self.batch_size]
            try:
                out.extend(self._embed_finding_bad(batch, start, failures))
            except ClientError as e:
                if e.status != 400 or not any(t in str(e) for t in _TOO_LARGE) or len(batch) == 1:
                    raise
                self.batch_size = max(1, len(batch) // 2)
                print(f"note: the server refused {len(batch)} images per request; sending {self.batch_size}",
                      file=sys.stderr)
                continue
            start += len(batch)
        return out

    def _embed_finding_bad(self, batch: list[bytes], offset: int, failures=None) -> list:
        try:
            return self._predict(batch)
        except ClientError as e:
            if e.status != 400 or any(t in str(e) for t in _TOO_LARGE):
                raise
            if len(batch) == 1:
                if failures is None:
                    raise ClientError(f"image {offset} cannot be embedded: {e}", status=400, index=offset,
                                      code=e.code) from None
                failures[offset] = str(e)
                return [None]
        half = len(batch) // 2
        return (self._embed_finding_bad(batch[:half], offset, failures)
                + self._embed_finding_bad(batch[half:], offset + half, failures))
