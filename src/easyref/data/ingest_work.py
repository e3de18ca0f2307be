"""The per-image work of ingest: fetch, check, normalise and store, spread over worker processes, each with many
requests in flight.

Each worker process takes a batch of images at a time. Its threads fetch (``ingest.fetch.concurrency`` requests
in flight: they wait on the network, not the CPU), and the worker's main thread decodes, resizes, hashes and stores
each image as its bytes arrive, so decoding stays one image at a time per process. At most ``concurrency`` images
are fetched or waiting to be decoded at once, which bounds a worker's memory by ``concurrency x max_bytes``. The
outcome of an image does not depend on when its bytes arrived: outputs equal a serial run's.
"""

from __future__ import annotations

import os
import secrets
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from easyref.data.fetch import fetch
from easyref.data.images import SUFFIXES, normalize
from easyref.data.ingest_config import IngestConfig
from easyref.data.outcome import Outcome, rejected_outcome
from easyref.data.reasons import Rejection

if TYPE_CHECKING:
    from easyref.data.sources import Location

BATCHES_PER_WORKER = 4
"""The images are cut into at least this many batches per worker, so that the workers finish together."""
BATCH_PER_REQUEST = 8
"""A batch holds at most this many images per request in flight (the window refills within a batch)."""


def process_image(location: Location, out: Path, config: IngestConfig) -> Outcome:
    """Fetch, check and normalise one image and store it content-addressed under ``out/images``."""
    return store_image(_fetch(location, config), out, config)


def store_image(data: bytes | Rejection, out: Path, config: IngestConfig) -> Outcome:
    """Check and normalise fetched bytes (or pass on the fetch's rejection) and store the image under ``out``."""
    try:
        if isinstance(data, Rejection):
            raise data
        image = normalize(data, config.image)
    except Rejection as exc:
        return rejected_outcome(exc)
    rel = f"images/{image.image_id[:2]}/{image.image_id}{SUFFIXES[config.image.format]}"
    target = out / rel
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(image.data)
        os.replace(tmp, target)
    return Outcome(
        image_id=image.image_id,
        path=rel,
        width=image.width,
        height=image.height,
        phash=image.phash,
        colour=image.colour,
    )


def process_batch(locations: list[Location], out: Path, config: IngestConfig) -> list[Outcome]:
    """The outcomes of ``locations`` in order; up to ``config.fetch.concurrency`` fetches in flight."""
    window = min(config.fetch.concurrency, len(locations))
    if window <= 1:
        return [process_image(location, out, config) for location in locations]
    outcomes: list[Outcome | None] = [None] * len(locations)
    queue = iter(enumerate(locations))
    pending: dict[Future[bytes | Rejection], int] = {}
    with ThreadPoolExecutor(window, thread_name_prefix="easyref-fetch") as threads:

        def submit_next() -> None:
            item = next(queue, None)
            if item is not None:
                pending[threads.submit(_fetch, item[1], config)] = item[0]

        for _ in range(window):
            submit_next()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                submit_next()  # the next request goes out before this image is decoded
                outcomes[index] = store_image(future.result(), out, config)
    return [outcome for outcome in outcomes if outcome is not None]


def process_all(
    todo: list[tuple[str, Location]], out: Path, config: IngestConfig, progress: bool
) -> dict[str, Outcome]:
    """Outcomes of the images not in the cache, computed by ``config.workers`` processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    locations = [location for _, location in todo]
    size = batch_size(len(locations), config.workers, config.fetch.concurrency)
    batches = [locations[i : i + size] for i in range(0, len(locations), size)]
    outcomes: list[Outcome] = []
    with tqdm(total=len(locations), unit="img", desc="ingest", disable=not progress or not locations) as bar:
        if config.workers == 1 or len(batches) < 2:
            for batch in batches:
                outcomes += process_batch(batch, out, config)
                bar.update(len(batch))
        else:
            context = multiprocessing.get_context("spawn")  # no inherited threads, locks or sockets
            with ProcessPoolExecutor(config.workers, mp_context=context) as pool:
                for done in pool.map(partial(process_batch, out=out, config=config), batches):
                    outcomes += done
                    bar.update(len(done))
    return {key: outcome for (key, _), outcome in zip(todo, outcomes, strict=True)}


def batch_size(images: int, workers: int, concurrency: int) -> int:
    """Images per batch: enough for ``concurrency`` requests in flight, small enough that every worker gets
    ``BATCHES_PER_WORKER`` batches, at most ``BATCH_PER_REQUEST x concurrency``."""
    least = min(concurrency, -(-images // workers))
    return max(1, least, min(BATCH_PER_REQUEST * concurrency, images // (BATCHES_PER_WORKER * workers)))


def _fetch(location: Location, config: IngestConfig) -> bytes | Rejection:
    try:
        return fetch(location, config.fetch)
    except Rejection as exc:
        return exc
