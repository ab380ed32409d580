"""The one shard writer: tensors into size-capped safetensors files (+ index), inside a staging
directory renamed into place at the end."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, Iterable

from mindport.checkpoint.safetensors_io import CheckpointError, SafetensorsWriter

DEFAULT_SHARD_BYTES = 5 * 10**9  # "5GB" as transformers reads it: no output file is larger
Entry = tuple[str, str, tuple[int, ...], int]  # (name, safetensors dtype, shape, nbytes)


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Group entries, in order, into shards of at most ``max_bytes``."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry[3] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def write_shards(directory: str, entries: list[Entry], chunks: Callable[[str], Iterable],
                 max_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict | None = None,
                 on_tensor: Callable[[], None] | None = None) -> dict[str, str]:
    """Write ``entries`` into ``directory`` as size-capped shards, plus ``model.safetensors.index.json``
    when there are several. ``chunks(name)`` yields the tensor's data (arrays, bytes or file ranges,
    :meth:`SafetensorsWriter.write_chunks`); ``on_tensor`` is called after each. Returns the weight map
    (tensor -> shard file)."""
    shards = plan_shards(entries, max_bytes)
    files = shard_names(len(shards))
    weight_map = {}
    for file_name, shard in zip(files, shards):
        writer = SafetensorsWriter(os.path.join(directory, file_name), [(n, d, s) for n, d, s, _ in shard],
                                   metadata or {"format": "pt"})
        for name, *_ in shard:
            writer.write_chunks(name, chunks(name))
            weight_map[name] = file_name
            if on_tensor:
                on_tensor()
        writer.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(e[3] for e in entries)}, "weight_map": weight_map}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    return weight_map


class StagingDir:
    """A temporary sibling directory renamed onto ``final`` on success, removed on failure.

    The temporary name carries the writer's pid (``.NAME.tmp-PID-XXXX``): a writer starting removes the
    staging directories of writers of the same destination that no longer run (killed with -9). The
    result gets the permissions of a directory made under the process umask (``mkdtemp`` makes 0700).
    """

    def __init__(self, final: str, overwrite: bool):
        self.final = os.path.abspath(final)
        if os.path.exists(self.final) and not overwrite:
            raise CheckpointError(f"{final}: destination exists (pass --overwrite / overwrite=True to replace it)")
        parent = os.path.dirname(self.final)
        os.makedirs(parent, exist_ok=True)
        prefix = f".{os.path.basename(self.final)}.tmp-"
        for name in os.listdir(parent):
            pid = name[len(prefix):].split("-", 1)[0]
            if name.startswith(prefix) and pid.isdigit() and not _running(int(pid)):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        self.path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        if os.path.exists(self.final):  # --overwrite: swap, then drop the old copy
            old = f"{self.final}.old-{os.getpid()}"
            os.replace(self.final, old)
            os.replace(self.path, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.final)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
