"""Small helpers shared by train.py, eval.py and inference.py: errors, files, metrics, versions."""
from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import stat
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """A problem with the user's input: printed as one line by the scripts, never as a traceback."""


class SaidByAnotherProcess(UserError):
    """A UserError every process of a launch stops with alike, which another process on this machine
    prints: N processes on one machine would otherwise print the same line N times."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or `kill`'s stop), raised where Ctrl-C raises KeyboardInterrupt, so that
    both unwind the same way: `finally` blocks run and the script ends with one line, not a traceback."""


_TERMINATED: list[bool] = []  # set by a SIGTERM, even where its exception gets swallowed


def raise_terminated(signum, frame):
    _TERMINATED.append(True)
    raise Terminated


def interrupt_handled() -> None:
    """A script caught the interrupt and said what it means: run_cli need not end the script for it."""
    _TERMINATED.clear()


def interrupt_name(interrupt: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(interrupt, Terminated) else "Ctrl-C"


def interrupted_exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's code for a process stopped by a signal: 128 + SIGTERM (15) or SIGINT (2)."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def run_cli(main_fn, argv=None) -> int:
    """Run a script's main: a UserError becomes a one-line message and exit code 2; Ctrl-C or SIGTERM
    a one-line message and exit code 130 or 143 (a script may catch them first to say more)."""
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
        if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:  # as the script set it for its imports
            signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread, where signals cannot be handled: leave them alone
        previous = None
    _TERMINATED.clear()
    try:
        code = main_fn(argv) or 0
        if _TERMINATED:  # raised inside a __del__ or a callback, Python printed it and went on
            raise Terminated
        return code
    except UserError as error:
        line = f"error: {for_terminal(user_message(error))}"
        if not isinstance(error, SaidByAnotherProcess):
            print(line, file=sys.stderr)
        tell_the_launcher(line)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({interrupt_name(interrupt)})", file=sys.stderr)
        return interrupted_exit_code(interrupt)
    except BrokenPipeError:  # `python inference.py ... | head -1`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 128 + signal.SIGPIPE
    except OSError as error:
        if error.errno not in DISK_FULL_OR_READ_ONLY:
            raise
        # The saves that matter say more where they fail (train.py: which checkpoint is whole); any other
        # write (a run's config at its start, a bad-samples list) gets this line, not a library's traceback.
        line = (f"error: cannot write {error.filename or 'a file'} ({error.strerror or error}); free some space "
                "(or use a writable folder) and run the command again")
        print(line, file=sys.stderr)
        tell_the_launcher(line)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        leave_process_group()


def resume_gc_after_loading() -> None:
    """Turn Python's cyclic garbage collector back on where a script turned it off at its top while torch,
    transformers and the backbones loaded (inference.py, eval.py, app.py, run as scripts): their some 380,000
    objects live as long as the process, and the collector went through all of them six times while they loaded,
    at every full collection after, and at the exit. One collection frees what loading left in reference cycles,
    the survivors are set aside for good (gc.freeze: later collections and the exit pass them over), and the
    collector goes on as usual. A no-op where the collector is on (a script's main() called from Python)."""
    if gc.isenabled():
        return
    gc.collect()
    gc.freeze()
    gc.enable()


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off inside (as it was after). Reading a large caption file makes millions
    of objects that live on, and each full collection went through all of them again: loading COCO's Karpathy
    file (123,287 images, 616,767 captions) took 30.7 s for its three splits with the collector on, 9.6 s off.
    Objects left in reference cycles are freed at the first collection after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class ReaderMayLeave:
    """sys.stdout for a script whose work is its files (train.py, eval.py): when the reader of its pipe goes (`| head`,
    a killed `| tee`), the next print raised BrokenPipeError, which ended a training run at once with no checkpoint.
    Standard output then goes to /dev/null (standard error too where it is the same pipe, `2>&1 |`, whose
    progress bars would fail next), a note says so on stderr otherwise, and the work goes on. Modules first
    imported meanwhile may keep this object: once `detached`, it writes wherever sys.<name> then points.
    The same for a standard error that is a pipe (`name` "stderr", `goes_on` None: no note, as its reader is the one
    gone): under `2>&1 | head -1` a progress bar met the closed pipe before any print did. (A stderr that is no pipe
    is left as it is: replaced the same way, something torch or its imports keep broke pytest's capture of it.)"""

    def __init__(self, stream, goes_on: str | None, name: str = "stdout"):
        self._stream, self._goes_on, self._name = stream, goes_on, name
        self.reader_left = self.detached = False

    def _target(self):
        current = getattr(sys, self._name)
        return current if self.detached and current is not None and current is not self else self._stream

    def write(self, text: str) -> int:
        try:
            return self._target().write(text)
        except BrokenPipeError:
            self._reader_has_left()
            return len(text)

    def flush(self) -> None:
        try:
            self._target().flush()
        except BrokenPipeError:
            self._reader_has_left()

    def _reader_has_left(self) -> None:
        if self.reader_left or self.detached:
            return
        self.reader_left = True
        shared = False
        with contextlib.suppress(OSError, ValueError):  # the buffered text, and the rest, go nowhere
            own = self._stream.fileno()
            descriptors = {own}
            for other in (sys.stdout, sys.stderr):
                with contextlib.suppress(AttributeError, OSError, ValueError):  # one with no descriptor is no pipe
                    if os.path.samestat(os.fstat(own), os.fstat(other.fileno())):
                        descriptors.add(other.fileno())
            shared = len(descriptors) > 1
            devnull = os.open(os.devnull, os.O_WRONLY)
            for descriptor in descriptors:
                os.dup2(devnull, descriptor)
            os.close(devnull)
        if shared or self._goes_on is None:
            return
        with contextlib.suppress(OSError, ValueError):
            print(f"note: the reader of standard output has gone (a closed pipe); {self._goes_on}", file=sys.stderr,
                  flush=True)

    def __getattr__(self, name: str):  # isatty, encoding, fileno...: the stream's own
        return getattr(self._target(), name)


def is_pipe(stream) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):  # None (closed with `2>&-`), or pytest's capture: no descriptor
        return False


@contextlib.contextmanager
def keep_going_if_the_reader_leaves(goes_on: str):
    """Inside, sys.stdout (and sys.stderr where it is a pipe) is a ReaderMayLeave (`goes_on` says what carries on);
    after, the original (pointed at /dev/null if its reader left, so the exit's flush cannot fail again)."""
    wrapped = {}
    if sys.stdout is not None:  # else started with it closed (`>&-`): print() already drops its text
        wrapped["stdout"] = ReaderMayLeave(sys.stdout, goes_on)
    if is_pipe(sys.stderr):
        wrapped["stderr"] = ReaderMayLeave(sys.stderr, None, "stderr")
    originals = {name: getattr(sys, name) for name in wrapped}
    for name, stream in wrapped.items():
        setattr(sys, name, stream)
    try:
        yield
        # Now, not at the exit: a short output (eval.py --compare) was all still buffered, and with its reader gone
        # by then the exit's flush printed "Exception ignored ... BrokenPipeError" after the work was done.
        for stream in wrapped.values():
            stream.flush()
    finally:
        for name, stream in wrapped.items():
            if getattr(sys, name) is stream:  # else something else replaced it meanwhile: theirs to restore
                setattr(sys, name, originals[name])
            stream.detached = True


LEAVE_GROUP_TIMEOUT_S = 10.0  # a group with nothing pending is torn down in well under a second


def leave_process_group() -> None:
    """Tear down the launcher's process group before the interpreter exits. Left to the exit (a run that
    stopped on an error, which never reaches accelerate's end_training), gloo's threads were destroyed while
    still running in about 1 start in 3 under torchrun: "terminate called without an active exception", and
    a SIGABRT that torchrun reported as the root cause instead of the one-line error."""
    if "torch.distributed" not in sys.modules:  # a lone process that never joined: nothing to import
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return

    def destroy() -> None:
        with contextlib.suppress(Exception):  # a peer already gone: there is nothing left to tear down
            dist.destroy_process_group()

    # Waited for a while, not for ever: with a collective of this process still pending (an error in the middle
    # of a backward pass), gloo's teardown waits for every peer to join it, which one busy elsewhere never does
    # (measured: until it exited). Hanging there kept the error from the launcher, which stops the others.
    leaving = threading.Thread(target=destroy, name="leave_process_group", daemon=True)
    leaving.start()
    leaving.join(LEAVE_GROUP_TIMEOUT_S)


def escape_surrogates(text: str) -> str:
    """`text` with the lone surrogates Python holds a file name's non-UTF-8 bytes as written as `\\udcXX`
    escapes: a UTF-8 stream (stdout, report.html) refuses them, and json.loads plus os.fsencode turn the
    escapes back into the name's bytes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


def for_terminal(text) -> str:
    """`text` with its control characters written as escapes (\\x1b, \\n): a run folder's name, a string in its
    JSON files or a caption from its LM's tokenizer, made elsewhere, printed raw could clear the user's screen
    (ESC[2J), retitle the terminal or break a one-line message into several."""
    return CONTROL_CHARACTERS.sub(lambda control: repr(control.group())[1:-1], str(text))


def add_dtype_flag(parser) -> None:
    """--dtype, for eval.py and inference.py (eval.add_loading_flags) and app.py (eval.chosen_dtype reads it)."""
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="the frozen backbones' weights: auto = bf16 on a GPU that computes in it (Ampere and "
                             "later), else fp32; on a CPU with AMX (Xeon Sapphire Rapids and later) bf16 captions "
                             "faster (README, Speed)")


DISK_FULL_OR_READ_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


SCRIPTS = "train.py, eval.py, inference.py, app.py, bench.py or demo.py"


def not_a_script(file: str) -> str:
    """What `python model.py --help` (any library module run as a script) says instead of nothing."""
    return f"{Path(file).name} is a library module, not a script: run {SCRIPTS} (each takes --help)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every script's --help: its docstring as written, and each flag's default, once. Not where the help
    names the default already, nor for a switch (store_true's False, a --no-X's True) or a flag whose
    default is nothing (None, ""): "(default: None)" says less than no note."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if ("(default" in help_text or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                or action.default in (None, "")):
            return help_text
        return super()._get_help_string(action)


def whole_number(minimum: int, maximum: int | None = None, meaning: str = ""):
    """An argparse type: an integer from minimum to maximum, else argparse's one-line error naming the
    flag, before anything loads. `meaning` says what a special value means, e.g. " (0 = all)"."""
    bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected a whole number {bounds}{meaning}, got {text!r}")
        return value

    return parse


def _not_blank(text: str, expected: str, advice: str = "") -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r} (an unset shell variable?){advice}")
    return text


def not_empty(text: str) -> str:
    """An argparse type for a path or name: refuses "" (an unset "$OUT"), which the scripts read as the flag
    left out: eval.py --out "" wrote into the run folder, over its metrics.json, without a word."""
    return _not_blank(text, "a folder or name", "; leave the flag out for its default")


def run_folder_argument(text: str) -> str:
    """An argparse type for a run folder to load: refuses "" (an unset "$RUN"), which became the current folder
    and a vague "adapter_config.json not found" there."""
    return _not_blank(text, "a run folder")


def positive_number(text: str) -> float:
    """An argparse type: a finite number > 0 (a limit of nan or inf would silently be no limit)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def first_line(error: BaseException) -> str:
    """An error's first line, or its kind where it says nothing: library messages run on for lines."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def user_message(error: UserError) -> str:
    """The one-line message. A UserError raised in a DataLoader worker (an image that cannot be
    read) reaches the main process wrapped in the worker's traceback; its last line is the message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and "DataLoader worker" in lines[0]:
        return lines[-1].partition("UserError: ")[2] or lines[-1]
    return str(error)


def default_image_workers() -> int:
    """DataLoader workers that decode images: one per CPU this process may use, at most 8.

    Decoding and preprocessing a 500x375 JPEG took 4.8 ms on one core here, so a fixed pair of
    workers would hold feature extraction to ~400 images/s on any machine, far below CLIP's pace
    on a GPU. Counted with sched_getaffinity, which honours taskset and container CPU sets.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores)


# Where an MPI launcher tells a process its world size (Accelerate's CPU multi-process path is mpirun).
MPI_WORLD_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE")


def lone_cpu_launch_warning(script: str) -> str:
    """A warning when `accelerate launch --cpu --num_processes N` ran this as one process, else "".

    Accelerate starts several CPU processes only through mpirun; without it its simple launcher
    starts one, setting MASTER_ADDR/PORT but no world size, and the run goes on alone and silent.
    """
    if "ACCELERATE_USE_CPU" not in os.environ or "MASTER_ADDR" not in os.environ:
        return ""
    from accelerate.utils import parse_flag_from_env  # how Accelerate itself reads the flag

    if not parse_flag_from_env("ACCELERATE_USE_CPU") or any(name in os.environ for name in MPI_WORLD_SIZE):
        return ""
    return (f"warning: this is 1 process: accelerate launch --cpu starts several only through mpirun; for N CPU "
            f"processes use ACCELERATE_USE_CPU=true torchrun --nproc_per_node N {script} ... (with --num_machines M "
            f"it starts one lone process on each machine: there, run on each ACCELERATE_USE_CPU=true torchrun "
            f"--nnodes M --node_rank R --master_addr IP --master_port PORT --nproc_per_node N {script} ...)")


# What a collective raises on the processes left when one of them is gone (gloo; NCCL reports its own).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_another_process(error: RuntimeError) -> str:
    """The reason, if `error` is a collective failing because another process of the run ended (stopped
    by a signal before training, or crashed): that process said why; here a traceback would bury it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return ""
    return next((reason for reason in PEER_LOST if reason in str(error)), "")


def another_process_ended(error: RuntimeError, what: str, consequence=lambda: "") -> int:
    """For `except RuntimeError` around a script's work under a launcher: where another process of the `what`
    (run, evaluation, captioning) ended, this one's one line saying so (and `consequence()`, what was left), also
    for the launcher's summary; exit status 1. Any other RuntimeError goes on up."""
    if not (reason := lost_another_process(error)):
        raise error
    line = f"error: another process of this {what} ended ({reason}), so this one stops too{consequence()}"
    print(line, file=sys.stderr)
    tell_the_launcher(line)  # the launcher's summary, printed last, showed a link on tracebacks in its place
    return 1


def launched_on_cpu(device: str = "auto") -> bool:
    """Whether the launcher's processes run on CPUs: where told to (ACCELERATE_USE_CPU, `accelerate launch
    --cpu`, --device cpu), or where there is no GPU, where they join only as CPU processes (Accelerator, not told,
    left each of plain torchrun's alone)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or device == "cpu" or not torch.cuda.is_available()


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started in all, read from its
    WORLD_SIZE before joining them: 1 for a plain `python script.py`."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def first_process_here() -> bool:
    """Whether this is the first process of its machine under a launcher (its LOCAL_RANK, readable before
    the processes join), or a lone process."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


def said_alike_before_joining() -> type[UserError]:
    """said_alike_by for a line every process says before the launcher's processes join (a bad flag: each
    parses the same command line): the first process of each machine says it."""
    return UserError if first_process_here() else SaidByAnotherProcess


def note(text: str, file=None) -> None:
    """Print a note every process of a launch finds alike, reading the same files (a caption counted once, an
    image left out): the first process of each machine prints it, as a lone process does; each used to
    print the same line."""
    if first_process_here():
        print(for_terminal(text), file=file)


def usage_errors_once_per_machine(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser`, whose usage and error lines (a flag argparse refuses) only the first process of each machine
    prints under a launcher; the others exit with the same code in silence. Every one tells the launcher why."""
    says_it = parser.error if first_process_here() else lambda message: parser.exit(2)

    def error(message: str):
        tell_the_launcher(f"{parser.prog}: error: {message}")
        says_it(message)

    parser.error = error
    return parser


def tell_the_launcher(line: str) -> None:
    """Leave the line a process stops with where torchrun (which `accelerate launch --multi_gpu` runs) reads why a
    worker failed, the file in TORCHELASTIC_ERROR_FILE. Its summary of the failed processes, printed after
    everything else, then shows that line under "traceback :", not a link on how to record a traceback there is
    none of, which buried the one line the run stopped with. Outside a launcher: nothing."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # The shape torch's own ErrorHandler.record_exception writes, the line in place of a Python traceback.
    failure = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
    with contextlib.suppress(OSError):  # the launcher's summary then says less; the script's line stands
        Path(path).write_text(json.dumps({"message": failure}), encoding="utf-8")


def machines() -> int:
    """How many machines the run's processes are on: torchrun (which accelerate launch --multi_gpu runs)
    starts LOCAL_WORLD_SIZE processes on each."""
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    return max(1, launched_processes() // per_machine) if per_machine else 1


def join_processes():
    """Join the process group a launcher set up (accelerate's PartialState, which Accelerator then
    reuses), before any file is read: a process that stops on a file missing on its machine (a disk of
    its own) then ends the others' first collective with "another process ended", where before it
    had joined they waited for it forever. Reads ACCELERATE_USE_CPU as Accelerator does."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def check_folder_is_shared(folder: str | Path, what: str, why: str) -> None:
    """Under several processes: stop every one of them, in one line, where some process cannot see a
    file the main process has just written into `folder` (machines with disks of their own; or the same
    flag naming different folders). A collective: every process calls it. Creates `folder` (the run
    would next); where that fails the check is left to the run's own, which says why in its words."""
    import secrets
    import socket

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    state = PartialState()
    if state.num_processes == 1:
        return
    folder = Path(folder).expanduser()
    probe = [None]
    if state.is_main_process:
        name = f".shared-check-{secrets.token_hex(8)}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(f"written by process 0 on {socket.gethostname()}\n")
            probe = [name]
        except OSError:
            pass
    name = broadcast_object_list(probe)[0]
    seen = name is None or state.is_main_process or _appears(folder / name)
    everyone = gather_object([(state.process_index, socket.gethostname(), seen)])
    if state.is_main_process and name is not None:
        with contextlib.suppress(OSError):
            (folder / name).unlink()
    blind = [(rank, host) for rank, host, ok in everyone if not ok]
    if blind:
        listed = ", ".join(f"{rank} on {host}" for rank, host in blind[:4]) + (" ..." if len(blind) > 4 else "")
        main_host = everyone[0][1]
        raise UserError(f"{what} {folder} is not one folder shared by every machine of this run: process"
                        f"{'es' if len(blind) > 1 else ''} {listed} cannot see the file process 0 (on {main_host}) "
                        f"wrote there. {why}: put it on a file system every machine mounts (NFS, Lustre, ...), at "
                        "the same path on each")


def _appears(path: Path, wait_s: float = 3.0) -> bool:
    """Whether `path` exists, looking again for a few seconds: a network file system may show another
    machine's new file a moment late."""
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def check_processes_agree(facts: dict[str, str], problem: str = "", advice: str = "") -> None:
    """Under several processes: stop every one of them with the same line where one found a `problem`
    (a file missing on its machine) or holds another value of a fact than process 0 (a digest of the
    data, the weights or the flags it loaded). Each machine reads its own copy of the data and the
    backbones; copies that differ would train or caption on different things without a word, and
    different flags would hang a collective. A collective: every process calls it, with the same keys."""
    import socket

    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    if state.num_processes == 1:
        if problem:
            raise UserError(problem)
        return
    everyone = gather_object([(state.process_index, socket.gethostname(), problem, facts)])
    stop = said_alike_by(state)
    _, main_host, main_problem, main_facts = everyone[0]
    if main_problem:
        raise stop(main_problem)
    for rank, host, their_problem, _ in everyone:
        if their_problem:
            raise stop(f"process {rank} (on {host}): {their_problem}{'; ' + advice if advice else ''}")
    for label, value in main_facts.items():
        differ = [(rank, host, theirs.get(label)) for rank, host, _, theirs in everyone if theirs.get(label) != value]
        if differ:
            listed = ", ".join(f"process {rank} on {host} {_short(theirs)}" for rank, host, theirs in differ[:3])
            raise stop(f"the processes of this run do not agree on {label}: process 0 on {main_host} has "
                       f"{_short(value)}, {listed}{' ...' if len(differ) > 3 else ''}"
                       f"{'; ' + advice if advice else ''}")


def said_alike_by(state=None) -> type[UserError]:
    """The error to raise for a line every process of a launch stops with alike (a check of data they
    agreed on, or check_processes_agree's verdict): the first process of each machine prints it (each
    machine has a terminal or log of its own), the others stop quietly. `state`: accelerate's PartialState."""
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    return UserError if state.local_process_index == 0 else SaidByAnotherProcess


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Processes:
    """This process among a script's processes: one, unless started by torchrun or accelerate launch. eval.py
    and train.py's validation shard their captioning with it, so both split and gather work the same way."""

    rank: int = 0
    count: int = 1
    device: torch.device | None = None

    @classmethod
    def from_environment(cls, script: str, device: str = "auto") -> Processes:
        """Join the launcher's processes (eval.py; train.py's Accelerator joins them itself)."""
        if launched_processes() <= 1:
            if warning := lone_cpu_launch_warning(script):
                print(warning, file=sys.stderr)
            return cls()
        from accelerate import PartialState

        # PartialState joins the process group torchrun / accelerate launch set up. Unlike Accelerator it
        # does not read ACCELERATE_USE_CPU, and without cpu=True it runs every CPU process alone.
        state = PartialState(cpu=launched_on_cpu(device))
        return cls(state.process_index, state.num_processes, state.device)

    @classmethod
    def of(cls, accelerator) -> Processes:
        """The processes an Accelerator (train.py's) joined."""
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device)

    @staticmethod
    def first() -> bool:
        """Whether this is the first (or only) process, read from the launcher's RANK without joining the
        process group: for work that needs no other process (--compare)."""
        return int(os.environ.get("RANK", "0")) == 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share_label(self, mine: int, total: int) -> str:
        """What the main process's progress bars count where several share the work: its own shard, which
        the others keep pace with, so the bar's total is not the split's."""
        return f", process 0's {mine:,} of {total:,} images" if self.count > 1 else ""

    def shard(self, length: int, batch_size: int) -> range:
        """This process's contiguous run of whole batches (empty where there are fewer batches than processes).
        No padding, so each item is taken exactly once, and in the same batch as in a single-process run: the
        captions, losses and metrics are identical."""
        batches = math.ceil(length / batch_size)
        first, last = self.rank * batches // self.count, (self.rank + 1) * batches // self.count
        return range(first * batch_size, min(last * batch_size, length))

    def agree(self, facts: dict[str, str], problem: str = "", advice: str = "") -> None:
        """Stop every process with the same line where one has a `problem` or other `facts` than process 0."""
        if self.count == 1:
            if problem:
                raise UserError(problem)
            return
        check_processes_agree(facts, problem, advice)

    def gather(self, items: list) -> list:
        """Every process's items, concatenated in rank order (which puts the shards back in split order)."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))


@contextlib.contextmanager
def stopping_together(processes: Processes, advice: str = ""):
    """A block every process runs alike (loading the data, a run, the backbones): a UserError in it stops
    every process with one line, process 0's, or naming the one process whose files differ (with `advice`),
    printed once per machine; left alone, each process printed the same line, or stopped alone while the
    others waited. A collective under several processes: every process leaves the block through it."""
    if processes.count == 1:
        yield
        return
    problem = ""
    try:
        yield
    except UserError as error:
        problem = user_message(error)
    processes.agree({}, problem=problem, advice=advice)


def weights_digest(module: torch.nn.Module, sample_bytes: int = 1 << 16) -> str:
    """A digest of a module's weights, cheap at any size: each tensor's name, dtype, shape and first
    `sample_bytes` bytes. Two copies of one checkpoint agree; another model, or the same one trained
    again, differs in the first bytes of its tensors."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        data = tensor.detach().reshape(-1)
        head = data[: max(1, sample_bytes // max(1, data.element_size()))].contiguous().cpu()
        digest.update(head.view(torch.uint8).numpy().tobytes() if head.numel() else b"")
    return digest.hexdigest()


def gpu_computes_in_bf16() -> bool:
    """Whether the GPU does bf16 arithmetic in hardware (compute capability 8.0 and later, or ROCm).
    torch.cuda.is_bf16_supported() alone also says yes on a T4 or V100, which only emulate bf16,
    several times slower than fp32 there: bf16 by default on those would slow every run down."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists: where writing `path` would begin (or fail)."""
    return next(p for p in (path, *path.parents) if p.exists())


def ids_digest(ids: Iterable[str]) -> str:
    """A short digest of a sequence of image ids: which images, in a few characters."""
    import hashlib

    return hashlib.sha256("\0".join(ids).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """blake2b (16 bytes, hex) of a file's bytes, read in 1 MiB blocks: which bytes, whatever its name or time."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_home() -> Path:
    """Where built demo assets live; CAPTIONER_HOME overrides it (tests point it at a temp dir).
    `~` is expanded here, as no shell does it in a quoted value, a .env file or a Dockerfile's ENV:
    unexpanded, the demo was built in a folder literally named `~` under the current one. An empty
    value counts as unset, not as the current folder. Absolute: a run's config names its demo backbones and data
    by this path, and a relative one (CAPTIONER_HOME=cache make demo) broke the run from any other folder. Without
    `..`: CAPTIONER_HOME=../cache names one folder from any sibling folder."""
    return normal_path(os.environ.get("CAPTIONER_HOME") or Path.home() / ".cache" / "captioner")


def normal_path(path) -> Path:
    """`path` absolute, `~` expanded and without `..` (os.path.abspath; Path.absolute keeps it): the demo cache's
    paths are compared as such, for a run under CAPTIONER_HOME=../cache names its assets work/a/../cache/... and
    from work/b they were not the cache's, so a cleared cache ended in advice to download a model."""
    return Path(os.path.abspath(Path(path).expanduser()))


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def sync_file(path: str | Path) -> None:
    """Flush a file's bytes to the disk (fsync)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def sync_folder(path: str | Path) -> None:
    """Flush a folder's entries (the names renamed into it) to the disk; nothing where the system
    cannot open a folder for it (Windows)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def sync_tree(folder: str | Path) -> None:
    """sync_file every file under `folder`, then sync_folder each folder, deepest first."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() and not path.is_symlink():
            sync_file(path)
        elif path.is_dir():
            sync_folder(path)
    sync_folder(folder)


def replace_durably(tmp: str | Path, path: str | Path) -> None:
    """os.replace(tmp, path) once tmp's bytes are on the disk, and the rename too before returning.

    A rename alone is atomic against a crash of the process, not against a power cut: file systems
    write a new file's data later than its name (ext4, XFS: up to half a minute), so the name could
    survive pointing at an empty file, where the old one was whole."""
    sync_file(tmp)
    os.replace(tmp, path)
    sync_folder(Path(path).parent)


@contextlib.contextmanager
def removed_unless_renamed(tmp: Path):
    """Around writing `tmp` and renaming it into place: where that fails or is interrupted (a full disk, Ctrl-C),
    `tmp` is deleted. Left there, a half-written copy stayed in the run folder until the next write of its file
    (predictions.jsonl.tmp, curve_loss.png.tmp after a Ctrl-C as eval.py wrote its outputs), and on a full disk
    it held on to space the error asked to free. (A SIGKILL leaves it: the next write replaces it.) A folder
    (train.py's last.tmp/, resume.tmp/) goes with what is in it."""
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):  # renamed already (a failed sync after it), or never made
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink()
        raise


@contextlib.contextmanager
def naming(path: Path):
    """Inside, an OSError that names no file (a write's or a close's: a full disk) names `path`: the one-line
    messages built from it (train.py's, eval.py's) named only the folder."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from None


def write_text(path: str | Path, text: str) -> None:
    """Replace a text file atomically and durably (written aside, then renamed: see replace_durably):
    a crash or power cut mid-write leaves the old file, never half a new one."""
    path = Path(path)
    with removed_unless_renamed(not_a_link(path.with_name(path.name + ".tmp"))) as tmp, naming(tmp):
        tmp.write_text(text, encoding="utf-8")
        replace_durably(tmp, path)


def not_a_link(path: str | Path) -> Path:
    """`path`, a symbolic link there removed first. For the files written in place (the .tmp a file is written as
    before its rename, a lock, a log appended to): open() writes through a link, and a run folder from elsewhere
    holding metrics.json.tmp -> ~/.bashrc (or .train.lock, last.tmp -> a folder) had eval.py or train.py --resume
    overwrite the file the link names. This project writes no links into a run folder, so none there is its own."""
    path = Path(path)
    if path.is_symlink():
        path.unlink(missing_ok=True)  # another process of the run may have removed it first
    return path


NONFINITE_SPELLING = {math.inf: "Infinity", -math.inf: "-Infinity"}


def finite_json(value):
    """`value` with every NaN or infinite float written as a string ("NaN", "Infinity", "-Infinity"):
    Python's json writes them as bare NaN/Infinity, which is not JSON, and jq, JavaScript and most
    other readers then refuse the whole file (train_log.jsonl logs a NaN step's losses)."""
    if isinstance(value, float) and not math.isfinite(value):
        return NONFINITE_SPELLING.get(value, "NaN")
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def json_text(data, **options) -> str:
    """Strict JSON (see finite_json): allow_nan=False makes any non-finite number that slipped past an error."""
    return json.dumps(finite_json(data), allow_nan=False, **options)


def write_json(path: str | Path, data) -> None:
    write_text(path, json_text(data, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def waiting_lock(path: Path, waiting: str):
    """Hold an exclusive advisory lock (flock) on the file `path`, saying `waiting` (on stderr) if
    another process holds it first and waiting for it. The system lets go of it however a process
    ends. Where there are no such locks (Windows, some network mounts) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(not_a_link(path), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_whole_number(value) -> bool:
    """An int read from JSON, not a bool (which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


# The most of a JSON file read whole. A run's configs, metrics and resume states hold kilobytes; its log and
# trainer_state.json (which lists the images of a caption folder trained on) grow with the run, a line or a
# name at a time. json.loads takes many times a file's size in memory (a 200 MB adapter_config.json, 1.3 GB),
# so a run folder from elsewhere with a 1 GB one ended in the system's out-of-memory kill, not in a message.
MAX_JSON_BYTES = 64 * 2**20
MAX_RECORDS_JSON_BYTES = 512 * 2**20  # train_log.jsonl, trainer_state.json: millions of lines or image names


def json_file_text(path: Path, label: str, limit: int = MAX_JSON_BYTES) -> str:
    """The text of the JSON file `path` (named `label` in the error), refused unread where it is larger than
    `limit`: far larger than any this project writes."""
    size = path.stat().st_size
    if size > limit:
        raise UserError(f"{label} is {size / 2**20:,.0f} MB, far more than this project writes there (it reads at "
                        f"most {limit / 2**20:,.0f} MB): restore the run's own file")
    return path.read_text()


def json_error(error: Exception) -> str:
    """Why a JSON text did not parse, in a few words: json.loads meets a deeply nested one (100,000 "[" of a
    run folder from elsewhere) with a RecursionError, which was a traceback."""
    return "nested too deeply" if isinstance(error, RecursionError) else str(error)


def json_value(path: str | Path, *keys: str):
    """The value under `keys` in a JSON file, or None where the file cannot be read or parsed, or
    does not hold it: for metadata that is only consulted (a missing or damaged file is reported,
    if at all, by whatever loads it)."""
    try:
        value = json.loads(json_file_text(Path(path), str(path)))
        for key in keys:
            value = value[key]
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError, UserError):
        return None
    return value


def read_json(path: str | Path, what: str = "file", limit: int = MAX_JSON_BYTES):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(json_file_text(path, f"{what} {path}", limit))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"{what} {path} is not valid JSON ({json_error(error)}); re-create it or point to "
                        "another") from None


def append_jsonl(path: str | Path, record: dict) -> None:
    with naming(path), open(not_a_link(path), "a") as handle:
        handle.write(json_text(record) + "\n")


def write_jsonl(path: str | Path, records) -> None:
    """Replace a JSONL file in one pass (see write_text)."""
    write_text(path, "".join(json_text(record) + "\n" for record in records))


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file. A last line without its newline that does not parse was cut
    short by a crash in append_jsonl: it is left out (the rest of the log is good). Any other line
    that is not JSON is an error naming the file and line."""
    try:
        text = json_file_text(Path(path), str(path), MAX_RECORDS_JSON_BYTES)
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not JSON lines: not UTF-8 text ({error})") from None
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as error:
            if number == len(lines):  # the file does not end with a newline: a torn last write
                break
            raise UserError(f"{path} line {number} is not JSON ({json_error(error)}); fix or delete that "
                            "line") from None
    return records


def library_versions() -> dict[str, str]:
    """Versions of the libraries a run depends on, for the checkpoint's metadata. Read from the
    installed packages' metadata, not by importing them: saving a checkpoint must not import (or
    fail for the want of) a library the run itself never used, such as datasets."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__,
            **{name: installed(name) for name in ("transformers", "accelerate", "datasets", "safetensors")}}


# ----------------------------------------------------------------------------------------------
# Caption metrics
# ----------------------------------------------------------------------------------------------

# Named precisely because several "ROUGE-L"s exist (see ../shared/stack-notes.md): this is the
# rouge-score package's F-measure, best reference by F1, its own lower-casing tokenizer, no stemming.
ROUGE_L_VARIANT = "rouge-score rougeL F1, multi-reference max (score_multi), no stemming"
BLEU_VARIANT = "nltk corpus_bleu BLEU-4, uniform weights, no smoothing, lower-cased whitespace tokens"


def rouge_l_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-caption ROUGE-L F1 against the best of its references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score_multi(list(refs), pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 over the whole set (BLEU is a corpus statistic, not a mean of sentence scores)."""
    from nltk.translate.bleu_score import corpus_bleu

    hypotheses = [pred.lower().split() for pred in predictions]
    refs = [[ref.lower().split() for ref in rs] for rs in references]
    if not any(hypotheses):
        return 0.0
    with warnings.catch_warnings():  # NLTK warns whenever a corpus has no 4-gram match; 0 is the answer
        warnings.simplefilter("ignore")
        return float(corpus_bleu(refs, hypotheses))


def caption_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    per_image = rouge_l_scores(predictions, references)
    return {
        "rougeL": float(np.mean(per_image)) if per_image else 0.0,
        "bleu4": bleu4(predictions, references),
        "num_images": len(predictions),
        "rougeL_per_image": per_image,
    }


# One caption whatever the image ("collapse") is a known failure of prefix captioners, often with
# a larger or different LM: the LM fits the captions' language and ignores the prefix. On a data set
# of similar images it can still score a fair ROUGE-L, so the captions are counted as well.
COLLAPSE_SHARE = 0.5  # one caption for half the images or more
COLLAPSE_MIN_IMAGES = 10  # fewer images say too little


def caption_diversity(predictions: Sequence[str]) -> dict:
    """How many different captions, and the most common one with its share of the images."""
    counts = Counter(predictions)
    top, count = counts.most_common(1)[0] if counts else ("", 0)
    return {"distinct_captions": len(counts), "top_caption": top, "top_caption_share": count / max(len(predictions), 1)}


def collapse_warning(diversity: dict, images: int, usual_share: float | None = None, what: str = "images") -> str:
    """A warning line when one caption covers COLLAPSE_SHARE of the images or more, else "".
    `usual_share`: the top share of captions that follow the data (the nearest-neighbour baseline's);
    a data set that repetitive is no sign of collapse, so the warning needs twice that share."""
    share = diversity["top_caption_share"]
    if images < COLLAPSE_MIN_IMAGES or share < COLLAPSE_SHARE:
        return ""
    if usual_share is not None and share < 2 * usual_share:
        return ""
    return (f"WARNING: one caption for {share:.0%} of the {images} {what} ({diversity['top_caption']!r}): the LM is "
            "not reading the image prefix (collapse); see the README's 'One caption for every image'")


def format_table(rows: Iterable[Sequence], header: Sequence[str]) -> str:
    rows = [[for_terminal(cell) for cell in row] for row in rows]
    header = [for_terminal(name) for name in header]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# ----------------------------------------------------------------------------------------------
# State without pickle: tensors in safetensors, everything else in JSON
# ----------------------------------------------------------------------------------------------

def _split_tensors(value, tensors: dict, path: str):
    """JSON-able structure with each tensor replaced by a reference into `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "ui" else value)
        return {"__ndarray__": path, "dtype": str(value.dtype)}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _split_tensors(item, tensors, f"{path}.{key}") for key, item in value.items()}
        return {"__items__": [[key, _split_tensors(item, tensors, f"{path}.{key}")] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_split_tensors(item, tensors, f"{path}.{i}") for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_split_tensors(item, tensors, f"{path}.{i}") for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path} without pickle")


def _join_tensors(value, tensors: dict):
    if isinstance(value, list):
        return [_join_tensors(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
    if "__tuple__" in value:
        return tuple(_join_tensors(item, tensors) for item in value["__tuple__"])
    if "__items__" in value:
        return {key: _join_tensors(item, tensors) for key, item in value["__items__"]}
    return {key: _join_tensors(item, tensors) for key, item in value.items()}


def with_usual_mode(path: str | Path) -> None:
    """Give a file the mode open() would (0666 less the umask). safetensors writes its files 0600,
    which hides a run's weights from the other users of a shared run folder."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


SAFETENSORS_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with a failed write raised as the OSError it is. safetensors reports a full disk
    (or a read-only one) as a SafetensorError, "I/O error: No space left on device (os error 28)", which no
    `except OSError` around a save caught: a real full disk ended train.py in safetensors' traceback, with
    resume.tmp/ left holding the space the run needed."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        if not (found := SAFETENSORS_OS_ERROR.search(str(error))):
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def save_state(folder: str | Path, name: str, state) -> None:
    """Write a nested state (optimizer, scheduler, RNG ...) as name.safetensors + name.json."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_tensors(state, tensors, name)
    folder = Path(folder)
    save_safetensors(tensors, folder / f"{name}.safetensors")
    with_usual_mode(folder / f"{name}.safetensors")
    write_json(folder / f"{name}.json", structure)


def load_state(folder: str | Path, name: str):
    """Read what save_state wrote; never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    structure = read_json(folder / f"{name}.json", f"{name} state")
    try:
        tensors = load_file(str(folder / f"{name}.safetensors"))
    except (SafetensorError, OSError) as error:
        raise UserError(f"{folder / name}.safetensors is missing or damaged ({error})") from None
    return _join_tensors(structure, tensors)


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        # Saved for every GPU the process saw; a machine with fewer (a run resumed elsewhere) has no generator for
        # the rest, and set_rng_state_all failed on them at CUDA's first use, in a traceback. A process trains on
        # its own device, whose index the machine resuming it has.
        for index, state in enumerate(states["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)


if __name__ == "__main__":
    sys.exit(not_a_script(__file__))
