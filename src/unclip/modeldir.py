"""The on-disk model format (DESIGN §4) and training checkpoints.

A model is a directory in the diffusers unCLIP layout (`tokenizer/`, `text_encoder/`, `prior/`,
`decoder/`, `super_res_first/`, ...; `model_index.json` only in exports and imports, docs/decisions.md)
plus `unclip.json`, unclip's own manifest:

    {"format_version": 1, "unclip_version": "0.1.0", "config": {...UnclipConfig...},
     "resolutions": [32, 128], "files": {"decoder/diffusion_pytorch_model.safetensors":
     {"bytes": 123, "sha256": "..."}, ...}, "stats": {...}, "extra": {...},
     "provenance": {...}, "evaluation": {...}}

Saving is atomic for the whole directory: components are written into a temporary sibling,
the manifest last, then the directory is swapped in with renames; a crash at any point leaves the
previous model loadable. Loading is strict: a missing, truncated or mismatched file is an error
that names the file and says what is wrong.

Training checkpoints (optimizer, EMA, RNG, data position) are single files written with
`save_checkpoint`, separate from this release format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unclip import __version__
from unclip.errors import ModelFormatError
from unclip.io import atomic_path, atomic_write, pid_alive, umask, write_json_atomic

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

MANIFEST = "unclip.json"
# the frozen CLIP's folders, which every stage trained against it carries
CLIP_COMPONENTS = ("tokenizer", "text_encoder", "image_encoder")
# a model's optional second text tower, which ranks the prior's and decoder's candidates (`unclip assemble --ranker`)
RANKER = "rank_text_encoder"
FORMAT_VERSION = 1

# format_version -> function upgrading a manifest dict of that version to the next one.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What `unclip.json` holds; `config` is the full UnclipConfig as a dict."""

    config: dict[str, Any]
    resolutions: tuple[int, ...] = ()
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    unclip_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "unclip_version": self.unclip_version,
            "resolutions": list(self.resolutions),
            "config": self.config,
            "files": self.files,
            "stats": self.stats,
            "extra": self.extra,
            "provenance": self.provenance,
            "evaluation": self.evaluation,
        }


def file_record(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def remove_abandoned(directory: Path) -> None:
    """Clean up after `save_model_dir` writers of `directory` that died: settle a `swap_in` killed
    between its renames (`restore_interrupted_swap`), then delete their half-written
    `.NAME.PID.XXXX.tmp` folders and the previous models they had moved aside."""
    restore_interrupted_swap(directory)
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.(\d+)\.\w+\.tmp")
    for path in directory.parent.glob(f".{directory.name}.*.tmp"):
        if (match := pattern.fullmatch(path.name)) and path.is_dir() and not pid_alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
    for old, _ in _abandoned_asides(directory):
        shutil.rmtree(old, ignore_errors=True)


def _abandoned_asides(directory: Path) -> list[tuple[Path, str]]:
    """(folder, writer's PID) of each previous model a `swap_in` whose writer has died moved aside."""
    asides = []
    for old in sorted(directory.parent.glob(f".{directory.name}.old-*")):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)) and old.is_dir():
            asides.append((old, pid))
    return asides


def restore_interrupted_swap(directory: Path) -> None:
    """Put back the previous model that a `swap_in` killed between its two renames had moved aside:
    nothing stands at `directory`, `.NAME.old-PID` holds the old model and the dead writer's
    `.NAME.PID.XXXX.tmp` the new one. Without that folder the aside copy is not a swap's to undo (a
    model the user deleted stays deleted)."""
    if directory.exists():
        return
    for old, pid in _abandoned_asides(directory):
        if not any(directory.parent.glob(f".{directory.name}.{pid}.*.tmp")):
            continue
        try:
            os.rename(old, directory)
        except OSError as err:
            log.warning("%s: a save was interrupted and the previous model is at %s, but it cannot be moved "
                        "back (%s)", directory, old, err)
            return
        log.warning("%s: a save of this model was interrupted; the previous model is back in place", directory)
        return


def temp_dir_beside(directory: Path) -> Path:
    """A new empty `.NAME.PID.XXXX.tmp` folder beside `directory`, where a model is built before it
    is swapped in: named so that `remove_abandoned` (and `restore_interrupted_swap`) clean up what a
    killed writer left there, and with the umask's permissions, not mkdtemp's 0700."""
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.{os.getpid()}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def save_model_dir(directory: str | Path, manifest: Manifest, write_components: Callable[[Path], None]) -> Path:
    """Write a model directory atomically.

    `write_components(tmp_dir)` writes every component into `tmp_dir`; then every file is
    recorded (size, sha256) in the manifest, the manifest is written last, and `tmp_dir` replaces
    `directory`. Until the final rename the previous model at `directory` is untouched.
    """
    directory = Path(directory)
    judge = manifest.extra.get("kind") == "judge"
    check_replaceable(directory, judge=judge)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(directory)
    tmp = temp_dir_beside(directory)
    try:
        write_components(tmp)
        files = {
            p.relative_to(tmp).as_posix(): file_record(p)
            for p in sorted(tmp.rglob("*")) if p.is_file() and p.name != MANIFEST
        }
        full = Manifest(**{**_fields(manifest), "files": files})
        write_json_atomic(tmp / MANIFEST, full.to_dict())
        swap_in(tmp, directory, judge=judge)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _fields(manifest: Manifest) -> dict[str, Any]:
    return {name: getattr(manifest, name) for name in manifest.__dataclass_fields__}


def check_replaceable(target: str | Path, marker: str = MANIFEST, *, judge: bool = False) -> None:
    """Refuse to write a model over anything but a model: `target` must be missing, an empty
    directory, or a directory holding `marker` (what an earlier save of this kind wrote). A judge
    (`judge=True`) replaces only a judge, and a model never replaces one: both write unclip.json,
    and `unclip eval judge --out MODEL` put a 2-step judge where a trained model had been."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    if target.is_dir() and not target.is_symlink() and (target / marker).is_file():
        if marker != MANIFEST or _holds_judge(target) == judge:
            return
        held, writing = ("a judge", "a model") if not judge else ("a model, not a judge", "the judge")
        raise ModelFormatError(f"{target} holds {held}; writing {writing} there would delete it. Choose another "
                               f"output path, or move {target} away first")
    what = "a directory without " + marker if target.is_dir() and not target.is_symlink() else "not a directory"
    raise ModelFormatError(
        f"{target} exists and is {what}, so it is not a model written before; unclip replaces only "
        f"its own model directories. Choose another output path, or move {target} away first")


def _holds_judge(directory: Path) -> bool:
    """Whether the unclip.json in `directory` is a judge's (`unclip.eval.judge.save_judge`)."""
    try:
        extra = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("extra") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(extra, dict) and extra.get("kind") == "judge"


def swap_in(new: Path, target: Path, marker: str = MANIFEST, *, judge: bool = False) -> None:
    """Replace `target` by `new` with two renames; the old one is removed only afterwards.

    `target` must pass `check_replaceable` (missing, empty, or a directory holding `marker`). If
    the second rename fails (or Ctrl-C lands between the two), the old one is moved back: the
    caller then deletes `new`, and `restore_interrupted_swap` only undoes a swap whose `new` is left.
    """
    check_replaceable(target, marker, judge=judge)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(directory: str | Path) -> Manifest:
    """Read and check `unclip.json`, migrating older format versions."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        restore_interrupted_swap(directory)
    if not directory.is_dir():
        raise ModelFormatError(f"{directory} is not a directory; a model is a directory holding {MANIFEST}")
    if not path.is_file():
        leftovers = sorted(directory.parent.glob(f".{directory.name}.old-*"))
        hint = f" A previous save was interrupted; the earlier model is at {leftovers[0]}." if leftovers else ""
        raise ModelFormatError(f"{path} is missing: {directory} is not an unclip model directory.{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{path} is truncated or corrupt (not valid JSON: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("format_version"), int):
        raise ModelFormatError(f"{path} has no integer format_version; it was not written by unclip")
    version = data["format_version"]
    if version > FORMAT_VERSION:
        raise ModelFormatError(
            f"{path} has format_version {version}, newer than this unclip reads ({FORMAT_VERSION}); "
            "upgrade unclip to load it")
    writer = f"unclip {data.get('unclip_version', '(unknown)')}"
    while version < FORMAT_VERSION:
        if version not in MIGRATIONS:
            raise ModelFormatError(
                f"{path} has format_version {version} (written by {writer}), older than this unclip {__version__} "
                f"can migrate to its format_version {FORMAT_VERSION}; load it with the unclip that wrote it, or "
                "train the model again")
        data = MIGRATIONS[version](data)
        if data.get("format_version") != version + 1:  # a migration that forgot to bump it looped forever
            raise ModelFormatError(f"{path}: the migration from format_version {version} did not give {version + 1}")
        version = version + 1
    for name in ("config", "files", "stats", "extra", "provenance", "evaluation"):
        if not isinstance(data.get(name, {}), dict):  # each failed later as an AttributeError or KeyError
            raise ModelFormatError(f"{path}: its {name} is not a JSON object; the file was edited or damaged "
                                   "(copy the model again, or re-run the command that wrote it)")
    for name, record in data.get("files", {}).items():
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int)
                and isinstance(record.get("sha256"), str)):
            raise ModelFormatError(f"{path}: its record of {name} has no bytes and sha256; the file was edited or "
                                   "damaged (copy the model again, or re-run the command that wrote it)")
    if (data.get("extra") or {}).get("kind") != "judge":  # a judge's config is a JudgeConfig
        _check_config(path, data, writer)
    try:
        return Manifest(**{**data, "resolutions": tuple(data.get("resolutions", ()))})
    except TypeError as err:
        raise ModelFormatError(f"{path} has unexpected fields: {err}") from None


def _check_config(path: Path, data: dict[str, Any], writer: str) -> None:
    """Refuse a manifest whose config this unclip cannot read, naming the file and who wrote it:
    the bare ConfigError (a key from a newer unclip, say) named neither."""
    from unclip.config import UnclipConfig
    from unclip.errors import ConfigError

    try:
        UnclipConfig.from_dict(data.get("config", {}))
    except ConfigError as err:
        fix = ("upgrade unclip to load it" if writer != f"unclip {__version__}" else
               "the file was edited or damaged: copy the model again, or re-run the command that wrote it")
        raise ModelFormatError(f"{path}: its config does not load here ({err}); it was written by {writer} and "
                               f"this is unclip {__version__}: {fix}") from None


_HASHED: dict[tuple[str, int, int], str] = {}  # (resolved path, bytes, mtime ns) → sha256, per process


def _sha256(path: Path) -> str:
    """The file's sha256, hashed once per process while its size and mtime stay the same: every
    stage of an assembled model verifies the one directory, and this reads each file once."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = file_record(path)["sha256"]
    return _HASHED[key]


def verify_files(directory: str | Path, manifest: Manifest, *, checksums: bool = True) -> None:
    """Check that every file the manifest lists is present with its recorded size and sha256.

    Hashing is cheap next to loading (about 1.5 GB/s here; 0.03 s for the shipped 44 MB model) and
    turns a damaged weight file of the right size into this error instead of silently wrong images.
    """
    directory = Path(directory)
    for name, record in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ModelFormatError(f"{path} is missing (listed in {directory / MANIFEST})")
        size = path.stat().st_size
        if size != record["bytes"]:
            state = "truncated" if size < record["bytes"] else "larger than recorded"
            raise ModelFormatError(f"{path} is {state}: {size} bytes, the manifest records {record['bytes']}")
        if checksums and _sha256(path) != record["sha256"]:
            raise ModelFormatError(f"{path} is corrupt: its sha256 differs from the one {directory / MANIFEST} "
                                   "records (a damaged copy: copy or download the model again)")


# --- weights ---------------------------------------------------------------------------------


def save_weights(path: str | Path, state: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_write(path, "wb") as handle:
        handle.write(save(tensors, metadata=metadata))
    return Path(path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or corrupt file is a ModelFormatError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path} is missing")
    try:
        return load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ModelFormatError(f"{path} is truncated or corrupt: {err}") from None


def load_into(module: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Strictly load weights from `path` into `module`: every key and shape must match."""
    state = load_weights(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    # integer weights for float parameters were cast in silence: images of truncated weights
    not_float = [f"{k} ({state[k].dtype})" for k, v in expected.items()
                 if k in state and v.is_floating_point() and not state[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) ({', '.join(missing[:5])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) ({', '.join(unexpected[:5])})")
    if wrong:
        problems.append(f"shape mismatch in {len(wrong)} tensor(s) (file vs model: {'; '.join(wrong[:5])})")
    if not_float:
        problems.append(f"{len(not_float)} tensor(s) of integers where the model has floats "
                        f"({', '.join(not_float[:5])})")
    if problems:
        raise ModelFormatError(f"{path} does not match its config: {', '.join(problems)}")
    module.load_state_dict(state, strict=True)
    return module


def half_model_dir(source: str | Path, target: str | Path) -> Path:
    """Copy a model directory with its float32 weights stored as float16 (half the bytes).

    Loading casts them back to the modules' float32, so the copy loads anywhere the original
    does; the manifest records the new files and `extra.weights_dtype = "float16"`. `target` is
    written atomically and may not be `source`.
    """
    import torch

    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        raise ModelFormatError(f"half_model_dir writes a copy; give a target other than {source}")
    manifest = read_manifest(source)
    verify_files(source, manifest)

    def components(tmp: Path) -> None:
        for name in manifest.files:
            src, dst = source / name, tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix != ".safetensors":
                shutil.copyfile(src, dst)
                continue
            state = {k: v.half() if v.dtype == torch.float32 else v for k, v in load_weights(src).items()}
            save_weights(dst, state, metadata={"format": "pt"})

    half = Manifest(**{**_fields(manifest), "extra": {**manifest.extra, "weights_dtype": "float16"}})
    return save_model_dir(target, half, components)


# --- training checkpoints --------------------------------------------------------------------


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write a training checkpoint (any torch-serialisable dict) atomically; a write that fails (a
    full disk, say) is a TrainingError naming `path`, and the previous checkpoint stays."""
    import torch

    from unclip.errors import TrainingError

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, str(tmp))  # by name: torch writes it from C++ (`atomic_path`)
    except (RuntimeError, OSError) as err:
        free = shutil.disk_usage(path.parent).free
        raise TrainingError(f"could not write the checkpoint {path} ({err}); {free / 2**20:.0f} MiB free there. "
                            "The previous checkpoint is intact: free some space and run the same command "
                            "to resume") from err
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint; a truncated or corrupt file is a ModelFormatError naming it."""
    import pickle
    import tarfile
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"checkpoint {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile, OSError,
            tarfile.TarError) as err:
        # ValueError: a file that is not a torch checkpoint at all fails on the pickle's magic number
        raise ModelFormatError(f"checkpoint {path} is truncated or corrupt ({err}); delete it to start the run "
                               "over, or put back a good copy to resume from it") from None
    if not isinstance(state, dict):
        raise ModelFormatError(f"checkpoint {path} does not hold a dict of training state")
    return state


def recorded_path(directory: str | Path) -> str:
    """How a manifest or eval.json names a path it records (the directory a run started from, the
    model, prompts and judge an evaluation read): relative to the working directory when it lies
    inside it (a model is read from other checkouts and machines, where this one's absolute path
    means nothing), as given otherwise."""
    path = Path(directory)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def init_record(directory: str | Path, section: str, cfg_section, *, record: str | None = None) -> dict:
    """Check that the model directory a run starts from (`--init`) holds the architecture being
    trained (its config's `section`, e.g. "decoder"; training settings may differ) and return what
    the run records as its `init`: the directory and the provenance of the weights it starts from (the
    manifest's `record` entry, by default `section`), so a model continued several times keeps its
    whole training history."""
    from dataclasses import replace

    from unclip.config import UnclipConfig
    from unclip.errors import ConfigError

    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    theirs = UnclipConfig.from_dict(manifest.config)
    theirs = theirs.upsamplers[int(section[-1]) - 1] if section.startswith("upsampler") else getattr(theirs, section)
    if replace(theirs, train=cfg_section.train) != cfg_section:
        raise ConfigError(f"--init {directory}: its {section} architecture differs from the one being trained; "
                          f"start from a model trained with the same {section} settings")
    log.info("%s initialised from %s", section, directory)
    return {"from": recorded_path(directory), "provenance": manifest.provenance.get(record or section, {})}


def continuation_seed(directory: str | Path, components: Iterable[str]) -> int:
    """A seed offset for a run that starts from the weights in `components` (folders) of the model
    at `directory` (`--init`): taken from their files' sha256, so that a continuation draws other
    data and noise than the run that made them, and the same on every resume. Without it each
    continuation replayed its parent's first samples, timesteps, noise and condition drops exactly
    (version 3 of the shipped decoder spent 1.23 M of its 1.76 M samples on version 2's)."""
    files = read_manifest(directory).files
    wanted = set(components)
    hashes = [record.get("sha256", name) for name, record in sorted(files.items()) if name.split("/")[0] in wanted]
    return int(hashlib.sha256("".join(hashes).encode()).hexdigest()[:7], 16)


def continued(directory: str | Path, components: Iterable[str], data, train, record: dict):
    """(data, train) sections of a run continued from `directory` (`--init`): its training data and
    noise drawn with `continuation_seed`'s offset, which goes into `record` (the manifest's `init`).
    Validation pairs come from the config's own `data`."""
    offset = continuation_seed(directory, components)
    record["seed_offset"] = offset
    log.info("continuing from %s: data and noise drawn with seed offset %d, so this run sees other samples "
             "than the one that made those weights", directory, offset)
    return replace(data, seed=data.seed + offset), replace(train, seed=train.seed + offset)


def init_from(module_parts: dict[str, torch.nn.Module], directory: str | Path, section: str, cfg_section) -> dict:
    """Load the weights of a trained model directory into freshly built networks (`--init`), after
    `init_record`'s check; returns its record."""
    from unclip.errors import ConfigError

    if missing := [path for path in module_parts if not (Path(directory) / path).is_file()]:
        raise ConfigError(f"--init {directory} holds no trained {section} ({missing[0]} is missing); give the model "
                          f"directory of a trained {section}, or an assembled model that has one")
    record = init_record(directory, section, cfg_section)
    for path, module in module_parts.items():
        load_into(module, Path(directory) / path)
    return record
