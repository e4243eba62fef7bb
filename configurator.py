"""The one command line of every script, nanoGPT's configurator as a function:

    python train.py --beta0=2 --r=-0.8 --preset=paper      # --key=value overrides a module-level setting
    python evaluate.py out/best.pt --eval_split=report     # one positional argument where a script takes one

A value takes the type of its default (an int is accepted where the default is a float, a bare `--flag` sets
a bool); `--preset=NAME` applies a script's preset first, so explicit flags win; every override is printed;
an unknown key or a wrong type is an error that names the key, the expected type or the valid keys. Also
what every script shares around it: the device choice, one-line errors for a user's files, atomic writes,
the names of a training run's files."""

import contextlib
import ctypes
import difflib
import errno
import hashlib
import math
import os
import shutil
from pathlib import Path

import torch

SETTING_TYPES = (bool, int, float, str)

# a train.py run's files in its out_dir: train.py writes them, the tools (sweep.py, analysis.py) read them
# the latest epoch (or where --max_steps stopped): what --resume=True continues
CHECKPOINT = "ckpt.pt"
BEST = "best.pt"  # the best epoch by evaluate.selection_score
LOG = "log.jsonl"  # one JSON record a line: the config, every log_interval, every evaluation
DEMO_TEACHER = "demo_teacher"  # out_dir/DEMO_TEACHER: the demo teacher's own run, trained first
# the demo's synthetic benchmark: tools/synthetic.py writes it, synthetic.layout names its parts
DEMO_DIR = "data/demo"


def settings(namespace):
    """The settings in a script's namespace: its lower-case bool / int / float / str globals, in order."""
    return {
        k: v
        for k, v in namespace.items()
        if k.islower() and not k.startswith("_") and type(v) in SETTING_TYPES
    }


def parse(key, text, default):
    """--key=text as the type of the default; float("2") is 2.0, so --beta0=2 works where the default is 2.0."""
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise SystemExit(
            f"--{key}={text}: expected {kind.__name__} (default {default!r})"
        ) from None


def configure(config, arguments, presets=None, positional="", rest=""):
    """Apply --preset=NAME, then --key=value and the one bare argument (config[positional]) to config, in
    place; `rest` names a list that takes every further bare argument (python predict.py CKPT PATH [PATH
    ...])."""
    presets = presets or {}
    if rest:
        bare = [a for a in arguments if not a.startswith("--")]
        config[rest] = bare[1:] if positional else bare
        arguments = [a for a in arguments if a.startswith("--")] + (bare[:1] if positional else [])
        if any(a.partition("=")[0] == f"--{rest}" for a in arguments):
            raise SystemExit(f"--{rest}: give them as arguments, not as --{rest}=...")
    for argument in [a for a in arguments if a.startswith("--preset=")] if presets else []:
        name = argument.split("=", 1)[1]
        if name not in presets:
            raise SystemExit(
                f"--preset={name}: unknown preset; expected one of {sorted(presets)}{closest(name, presets)}"
            )
        for key, value in presets[name].items():
            print(f"overriding: {key} = {value!r} (preset {name})")
            config[key] = value
    bare = [a for a in arguments if not a.startswith("--")]
    if len(bare) > (1 if positional else 0):
        expected = f"one {positional}" if positional else "--key=value"
        raise SystemExit(
            f"unexpected arguments {bare}; expected {expected} (valid keys: {', '.join(config)})"
        )
    for argument in arguments:
        if presets and argument.startswith("--preset="):
            continue
        key, has_value, text = (
            argument[2:].partition("=")
            if argument.startswith("--")
            else (positional, "=", argument)
        )
        if key not in config:
            raise SystemExit(
                f"unknown config key {key!r}{closest(key, config)}; valid keys: {', '.join(sorted(config))}"
            )
        if not has_value and not isinstance(config[key], bool):
            raise SystemExit(f"--{key} needs a value: --{key}=<{type(config[key]).__name__}>")
        config[key] = parse(key, text if has_value else "true", config[key])
        print(f"overriding: {key} = {config[key]!r}")
    return config


def refuse(config, rules):
    """Exit with one line per broken rule, (setting, holds, expected), before anything runs. A float that is
    not finite breaks a rule of its own first (nan passes no comparison, inf passes some)."""
    not_finite = [k for k, v in config.items() if type(v) is float and not math.isfinite(v)]
    problems = [f"--{k}={config[k]!r}: expected a finite number" for k in not_finite]
    problems += [
        f"--{k}={config[k]!r}: expected {why}"
        for k, holds, why in rules
        if not (holds or k in not_finite)
    ]
    if problems:
        raise SystemExit("\n".join(problems))


def closest(value, accepted):
    """' (did you mean X?)' for the accepted name nearest a mistyped one (difflib, ignoring case), else ''."""
    by_lower = {str(name).lower(): name for name in accepted}
    match = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""


def one_of(value, accepted):
    """What a name setting expects, for its one-line error: 'one of a, b, c (did you mean b?)'."""
    names = ", ".join(repr(name) if name == "" else str(name) for name in accepted)
    return f"one of {names}{closest(value, accepted)}"


def choice(key, value, accepted):
    """The rule (for refuse) that setting `key` is one of `accepted`; its error suggests the closest."""
    return key, value in accepted, one_of(value, accepted)


DEVICES = ("cpu", "cuda", "cuda:N", "mps")


def pick_device(device=""):
    """'' = cuda, else mps, else cpu: the meaning of every script's --device=''. A named device must be one
    of DEVICES and present on this machine, checked before anything runs (one line, not a traceback on first
    use)."""
    if not device:
        return (
            "cuda"
            if torch.cuda.is_available()
            else "mps"
            if torch.backends.mps.is_available()
            else "cpu"
        )
    kind, colon, index = device.partition(":")
    if kind not in ("cpu", "cuda", "mps") or colon and (kind != "cuda" or not index.isdigit()):
        raise SystemExit(f"--device={device}: expected '' (automatic) or {one_of(device, DEVICES)}")
    present = {
        "cpu": True,
        "cuda": int(index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }
    if not present[kind]:
        found = f"{torch.cuda.device_count()} CUDA devices" + (
            ", MPS" if torch.backends.mps.is_available() else ""
        )
        raise SystemExit(
            f"--device={device}: not on this machine (torch finds {found}); use --device=cpu or ''"
        )
    return device


@contextlib.contextmanager
def user_errors(prefix):
    """A missing, unreadable or mismatched file of the user's ends the script with one line, not a traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{prefix}: {error}") from None


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside `path` to write to; once the block ends without an error it replaces `path`
    in one rename, so a crash never leaves a half-written file (or folder, e.g. a .mlpackage) where a good
    one is expected. The temporary file is flushed to disk first and removed when the block fails. A link
    (out_dir -> elsewhere) is written through: the folder it points to is replaced, the link stays."""
    path = os.path.realpath(os.fspath(path))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        if os.path.isfile(tmp):
            descriptor = os.open(tmp, os.O_RDONLY)
            os.fsync(descriptor)
            os.close(descriptor)
        # A folder cannot replace a folder in one rename, but Linux swaps two in one step (exchange);
        # elsewhere a kill between the two renames leaves `path` missing, the new folder complete at tmp,
        # the old at tmp.old
        if os.path.isdir(tmp) and os.path.isdir(path):
            if not exchange(tmp, path):
                os.replace(path, tmp + ".old")
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + ".old"):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover)
            elif os.path.exists(leftover):
                os.remove(leftover)


def exchange(a, b):
    """Swap two existing paths in one step (Linux's renameat2 with RENAME_EXCHANGE) -> False where the
    system or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc / not Linux
        return False
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE (linux/fcntl.h, linux/fs.h)
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def check_folder(path, flag):
    """A folder setting (--out_dir, --save_frames) that names a file, or lies under one: refused before any work."""
    for part in [Path(path), *Path(path).parents]:
        if part.exists():
            if not part.is_dir():
                raise ValueError(f"{flag}={path}: {part} is a file, not a folder")
            return


def check_replaceable(path, flag, names, writer):
    """A folder a command replaces as a whole (predict.py's and synthetic.py's --out_dir): new, or holding
    only what `writer` writes there (`names`); anything else in it is refused before any work, naming it."""
    check_folder(path, flag)
    foreign = sorted(set(os.listdir(path)) - set(names)) if os.path.isdir(path) else []
    if foreign:
        raise ValueError(
            f"{flag}={path} holds files {writer} did not write ({', '.join(foreign[:3])}), and it is "
            "replaced as a whole: give a new or empty folder"
        )


def file_sha256(path):
    """The sha256 of a file, read in 16 MiB blocks: which checkpoint (or teacher) produced a result."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions(names):
    """{package: installed version or None}: what produced a result."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_atomic(path, content):
    """Write str (UTF-8) or bytes to `path` through atomic_path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
