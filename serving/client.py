"""A small REST client for the exported encoder, for TF Serving or the local stand-in.

    python -m serving.client --url http://localhost:8501 --model simsiam cat.jpg dog.png

prints [{"image": "cat.jpg", "embedding": [0.12, ...]}, ...] as JSON. It depends only on the
serving signature (`image_bytes` in, `embedding` out) and the standard library: no
TensorFlow on the client side.

    from serving.client import EmbeddingClient
    vectors = EmbeddingClient("http://localhost:8501", "simsiam").embed([open("cat.jpg", "rb").read()])
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import time
import urllib.error
import urllib.request

RETRYABLE_STATUS = {429, 502, 503, 504}


class ClientError(Exception):
    """The server rejected a request, or could not be reached after the retries.

    `status` is the HTTP status (None when the server was not reached); `index` is the
    position of the image the server could not embed, when one image is to blame.
    """

    def __init__(self, message, status=None, index=None):
        super().__init__(message)
        self.status = status
        self.index = index


# How TF Serving's batching refuses a request larger than its max_batch_size
# ("Task size 100 is larger than maximum input batch size 64").
_TOO_LARGE = ("larger than maximum input batch size", "max_batch_size")


class EmbeddingClient:
    """Embeds images through TF Serving's REST predict API.

    Args:
        url: server root, e.g. http://localhost:8501.
        model: the served model name.
        version: a specific model version, or None for the newest.
        batch_size: images per request.
        timeout: seconds per request.
        retries: extra attempts after a connection failure, timeout or 429/502/503/504,
            with exponential backoff starting at `backoff` seconds.
    """

    def __init__(self, url, model, version=None, batch_size=32, timeout=30.0, retries=3, backoff=0.5,
                 signature="serving_default"):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.url = url.rstrip("/")
        self.model = model
        self.version = version
        self.batch_size = batch_size
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.signature = signature

    @property
    def model_url(self) -> str:
        path = f"{self.url}/v1/models/{self.model}"
        return path if self.version is None else f"{path}/versions/{self.version}"

    def embed(self, images: list[bytes]) -> list[list[float]]:
        """Embeddings of JPEG/PNG-encoded images, in order, in requests of `batch_size`.

        A server that refuses the request size (TF Serving with batching and a smaller
        max_batch_size) makes the client halve `batch_size` until it fits, and keep it.
        A request the server cannot run (an image that does not decode fails its whole
        request) is split until the image to blame is found: ClientError names its
        index.
        """
        out = []
        start = 0
        while start < len(images):
            batch = images[start : start + self.batch_size]
            try:
                out.extend(self._embed_finding_bad(batch, start))
            except ClientError as e:
                if e.status != 400 or not any(t in str(e) for t in _TOO_LARGE) or len(batch) == 1:
                    raise
                self.batch_size = max(1, len(batch) // 2)
                print(f"note: the server refused {len(batch)} images per request; sending {self.batch_size}",
                      file=sys.stderr)
                continue
            start += len(batch)
        return out

    def _embed_finding_bad(self, batch: list[bytes], offset: int) -> list[list[float]]:
        try:
            return self._predict(batch)
        except ClientError as e:
            if e.status != 400 or any(t in str(e) for t in _TOO_LARGE):
                raise
            if len(batch) == 1:
                raise ClientError(f"image {offset} cannot be embedded: {e}", status=400, index=offset) from None
        half = len(batch) // 2
        return self._embed_finding_bad(batch[:half], offset) + self._embed_finding_bad(batch[half:], offset + half)

    def _predict(self, batch: list[bytes]) -> list[list[float]]:
        body = {
            "signature_name": self.signature,
            "instances": [{"image_bytes": {"b64": base64.b64encode(b).decode("ascii")}} for b in batch],
        }
        predictions = self._request("POST", ":predict", body)["predictions"]
        if len(predictions) != len(batch):
            raise ClientError(f"server returned {len(predictions)} embeddings for {len(batch)} images")
        return predictions

    def status(self) -> dict:
        return self._request("GET", "", None)

    def metadata(self) -> dict:
        return self._request("GET", "/metadata", None)

    def _request(self, method, suffix, body):
        data = None if body is None else json.dumps(body).encode("utf-8")
        url = self.model_url + suffix
        attempt = 0
        while True:
            request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code not in RETRYABLE_STATUS or attempt >= self.retries:
                    raise ClientError(f"{method} {url}: HTTP {e.code}: {message}", status=e.code) from None
                reason = f"HTTP {e.code}"
            except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
                if attempt >= self.retries:
                    why = getattr(e, "reason", e)
                    raise ClientError(f"{method} {url}: cannot reach the server after {attempt + 1} attempt(s) ({why})") from None
                reason = type(e).__name__
            delay = self.backoff * 2**attempt
            print(f"retrying {method} {url} in {delay:.1f} s ({reason})", file=sys.stderr)
            time.sleep(delay)
            attempt += 1


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read().decode("utf-8"))["error"]
    except Exception:
        return error.reason or "no message"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.client", description="Embed images with a served SimSiam encoder.")
    p.add_argument("images", nargs="+", help="JPEG or PNG files")
    p.add_argument("--url", default="http://localhost:8501", help="server root (default http://localhost:8501)")
    p.add_argument("--model", default="simsiam", help="model name (default simsiam)")
    p.add_argument("--version", type=int, help="model version (default: the newest)")
    p.add_argument("--batch-size", type=int, default=32, help="images per request")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=3, help="retries on connection errors and 429/502/503/504")
    args = p.parse_args(argv)
    images = []
    for path in args.images:
        try:
            with open(path, "rb") as f:
                images.append(f.read())
        except OSError as e:
            print(f"client: error: cannot read {path}: {e.strerror}", file=sys.stderr)
            return 2
    client = EmbeddingClient(args.url, args.model, args.version, args.batch_size, args.timeout, args.retries)
    try:
        vectors = client.embed(images)
    except ClientError as e:
        where = f"{args.images[e.index]}: " if e.index is not None else ""
        print(f"client: error: {where}{e}", file=sys.stderr)
        return 1
    json.dump([{"image": path, "embedding": v} for path, v in zip(args.images, vectors)], sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
