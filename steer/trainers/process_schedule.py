"""The ``process`` guidance schedule: rounds in a worker *process*, weights exchanged explicitly.

Same versions as :class:`~steer.trainers.schedule.ParallelSchedule` (round 0 is waited for unless
``wait_warmup=False``; round ``k >= 1`` runs while the policy trains steps ``[kI, (k+1)I)`` with guidance
version ``k-1``, staleness 1, and is swapped in at step ``(k+1)I``; ``synchronised=True`` waits for every
round), but the rounds ``k >= 1`` (sampling, labelling, guidance training) run in a spawned child process with
its own interpreter, so the policy's training and the round truly overlap: no shared interpreter lock, and on
a GPU its own CUDA context (its own streams), on the same device or on ``device`` (e.g. ``"cuda:1"``). Round 0,
which is waited for, runs in the trainer's process, on the policy's device, while the worker starts (with
``wait_warmup=False`` it runs in the worker like the others).

Design (one worker per training process, owned by it; with ``accelerate launch`` each rank owns one):

- The :class:`~steer.trainers.schedule.GuidanceLearner` is built in the trainer's process on a *worker copy*
  of the policy (:func:`worker_copy`: new trainable tensors, the frozen base tensors *shared* with the trained
  policy). The worker process is spawned when the first round starts, with only the names of the modules the
  learner needs, which it imports at once (transformers, peft, the constraint's module: seconds of start-up).
  The warm-up round (round 0) is waited for anyway, so it runs *here*, with all the CPU threads, while the
  worker imports. Then the learner is shipped over the pipe (pickled by
  ``torch.multiprocessing``: CPU tensors move to shared memory, CUDA tensors go by CUDA IPC), so the frozen
  base weights are one physical copy for both processes; only the trainable policy weights (LoRA) and the
  guidance model are the worker's own. The learner is not kept in the trainer's process once shipped.
- Each background round start sends the policy's trainable tensors and the current guidance tensors (after
  any cross-rank averaging); each finished round sends back its metrics, its guidance tensors and its training
  samples (the trainer's KL-on-samples pool). These messages are ``torch.save`` bytes, read with
  ``torch.load(weights_only=True)``.
- CPU threads follow the work: while a round runs in the worker, the policy keeps ``total - worker_threads``
  of them and the worker ``worker_threads``; once the round has come back (checked before every step), the
  policy takes them all again until the next round starts.
- Every receive has a timeout (``timeout`` seconds for a round or a state request) and checks that the worker
  is alive; the worker polls its pipe and exits when the trainer's process goes away. A round's error is sent
  back with its type, message and traceback and raised in the trainer at the next step (:meth:`check`); a
  worker that dies is reported with its exit code. :meth:`close` stops the worker (or terminates it, if a
  round is still running) and joins it: no child process is left behind.

The worker must be able to import what it is sent: it does not run the script being run (``__main__``; so an
unguarded training script is never started twice), hence a constraint class must live in an importable
module, not in that script (refused with a clear error). Randomness: rounds depend only on
``(seed, round, rank)`` and the weights (:mod:`steer.trainers.schedule`), so with the same thread count the
worker process computes the same guidance weights as the thread worker (a test checks this).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
import sys
import time
import types
import weakref
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # registers the tensor reductions (shared memory, CUDA IPC) with ForkingPickler

from ..errors import UserInputError
from .buffer import SampleBuffer
from .schedule import (
    BackgroundSchedule,
    GuidanceLearner,
    GuidanceRoundError,
    _check_schedule,
    copy_tensors,
    set_thread_share,
)

logger = logging.getLogger(__name__)

__all__ = ["GuidanceWorkerError", "ProcessSchedule", "worker_copy"]

_POLL_SECONDS = 0.5


class GuidanceWorkerError(RuntimeError):
    """The guidance worker process failed (a round raised, the process died, or it did not answer in time)."""

    def __init__(self, message: str, *, worker_type: str | None = None, worker_traceback: str = "") -> None:
        super().__init__(message)
        self.worker_type = worker_type
        self.worker_traceback = worker_traceback


def worker_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose frozen parameters are the original's (shared), the trainable ones new.

    The worker trains nothing of the policy and never writes its frozen weights, so sharing them is safe;
    shipped to the worker process, they stay one physical copy (shared memory on CPU, CUDA IPC on a GPU).
    """
    memo = {id(p): p for p in model.parameters() if not p.requires_grad}
    twin = copy.deepcopy(model, memo)
    for module in twin.modules():  # hooks that are closures cannot be pickled: swap in module-level twins
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__qualname__", "").endswith(
                "enable_input_require_grads.<locals>.make_inputs_require_grads"
            ):
                module._forward_hooks[key] = _inputs_require_grads
    return twin


def _inputs_require_grads(module, args, output) -> None:
    """transformers' ``enable_input_require_grads`` hook (a closure there), picklable."""
    output.requires_grad_(True)


def _modules_of(learner: GuidanceLearner) -> list[str]:
    """The modules whose classes make up ``learner`` (the worker imports them before the learner arrives)."""
    names = {type(m).__module__ for m in learner.policy.modules()}
    names |= {type(m).__module__ for m in learner.guidance.modules()}
    names |= {
        type(learner.constraint).__module__,
        type(learner.tokenizer).__module__,
        type(learner).__module__,
    }
    return sorted(n for n in names if n and n not in ("__main__", "builtins"))


def _round_reply(learner: GuidanceLearner, metrics: dict) -> dict:
    """What a finished round hands back: its metrics, guidance tensors and training samples (as sent)."""
    return {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "guidance": [t.cpu() for t in learner.guidance_tensors()],
        "latest": SampleBuffer.items_state(learner.latest),
    }


def _pending(round_index: int, reply: dict) -> tuple:
    """A round's reply as the schedule keeps it until it is swapped in: (round, metrics, guidance, samples)."""
    return round_index, reply["metrics"], reply["guidance"], SampleBuffer.items_from_state(reply["latest"])


def _dumps(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes, device=None):
    return torch.load(io.BytesIO(data), map_location=device or "cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- the worker
def _worker_main(conn, preload: list[str], threads: int | None, device, log_level):
    """The worker process: import ``preload``, take the learner, answer ``round``/``state``/``load`` requests.

    Runs until ``stop`` or until the trainer's process is gone.
    """
    logging.basicConfig(level=log_level, format="[guidance worker] %(levelname)s %(name)s: %(message)s")
    for name in preload:  # while the trainer runs the first round: unpickling the learner needs these
        with contextlib.suppress(Exception):  # a module that fails here fails again, reported, at unpickling
            importlib.import_module(name)
    if threads:
        set_thread_share(threads)
    parent = os.getppid()
    learner: GuidanceLearner | None = None
    policy_params: list[torch.Tensor] = []
    target = None
    while True:
        try:
            if not conn.poll(_POLL_SECONDS):
                if os.getppid() != parent:  # the trainer's process is gone: nobody will ask again
                    return
                continue
            kind, index, payload = conn.recv()
        except (EOFError, OSError):
            return
        if kind == "stop":
            return
        try:
            if kind == "learner":  # the learner and the names of its policy tensors, pickled by the trainer
                learner, names = ForkingPickler.loads(payload)
                if device is not None:
                    learner.policy.to(device)
                    learner.guidance.to(device)
                target = torch.device(device) if device is not None else learner._device()
                named = dict(learner.policy.named_parameters())
                policy_params = [named[n] for n in names]
                continue  # no answer; a failure is answered, and the trainer reads it as its next request's
            if learner is None:
                raise RuntimeError(f"{kind!r} requested before the learner was sent")
            if kind == "round":
                data = _loads(payload, target)
                copy_tensors(policy_params, data["policy"])
                copy_tensors(learner.guidance.trainable_parameters(), data["guidance"])
                reply = _round_reply(learner, learner.run_round(index))
            elif kind == "state":
                reply = learner.state_dict()
            elif kind == "load":
                learner.load_state_dict(_loads(payload, target))
                reply = {}
            else:
                raise ValueError(f"unknown request {kind!r}")
            answer = ("ok", index, _dumps(reply))
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the trainer
            import traceback

            info = {
                "type": type(err).__name__,
                "message": str(err),
                "traceback": traceback.format_exc(),
                "round_error": isinstance(err, GuidanceRoundError),
                "user_error": isinstance(err, UserInputError),
            }
            answer = ("error", index, _dumps(info))
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return


def _shutdown(process, conn, graceful: bool, stop_timeout: float) -> None:
    """Stop the worker: ask it to stop (if idle), else terminate; always join it (no zombie)."""
    if process is None:
        return
    if graceful and process.is_alive():
        with contextlib.suppress(Exception):
            conn.send(("stop", -1, b""))
        process.join(stop_timeout)
    if process.is_alive():
        process.terminate()
        process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join(5.0)
    with contextlib.suppress(Exception):
        conn.close()
    with contextlib.suppress(Exception):
        process.close()


# ---------------------------------------------------------------------------------------------- the schedule
class ProcessSchedule(BackgroundSchedule):
    """Round ``k`` runs in a worker process while the policy trains on version ``k-1`` (staleness 1).

    ``learner``: the rounds' :class:`GuidanceLearner`, built on :func:`worker_copy` of the policy (it is sent
    to the worker at the first round and not kept here). ``policy_params``: callable returning the trained
    policy's trainable tensors; ``policy_names``: their names in ``learner.policy`` (same order).
    ``guidance_params``: callable returning the trainer's guidance tensors, into which finished versions are
    copied. ``sync_weights(params)``: averages the swapped-in guidance across processes (``None`` on one).
    ``worker_threads``: the worker's intra-op CPU threads (``None``: half of this process's, which keeps the
    rest while the worker runs). ``device``: where the worker computes (``None``: where the learner's model
    is). ``timeout``: seconds to wait for a round's (or a state request's) answer before giving up.
    """

    name = "process"

    def __init__(
        self,
        learner: GuidanceLearner,
        *,
        policy_params,
        policy_names: list[str],
        guidance_params,
        synchronised: bool = False,
        worker_threads: int | None = None,
        sync_weights=None,
        wait_warmup: bool = True,
        device: str | torch.device | None = None,
        timeout: float = 3600.0,
        stop_timeout: float = 30.0,
    ) -> None:
        if len(policy_params()) != len(policy_names):
            raise ValueError("policy_names does not match the trained policy's parameters")
        named = dict(learner.policy.named_parameters())
        missing = [n for n in policy_names if n not in named]
        if missing:
            raise ValueError(f"the worker's policy copy has no parameters {missing[:3]}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self._learner: GuidanceLearner | None = learner
        self.pad_token_id = learner.pad_token_id
        self.policy_params = policy_params
        self.policy_names = list(policy_names)
        self.guidance_params = guidance_params
        self._init_background(
            synchronised=synchronised,
            worker_threads=worker_threads,
            sync_weights=sync_weights,
            wait_warmup=wait_warmup,
        )
        self.device = None if device is None else str(device)
        self.timeout = float(timeout)
        self.stop_timeout = float(stop_timeout)
        self._process = None
        self._conn = None
        self._finalizer = None
        self._running: int | None = None  # the round the worker is running (None: idle)
        self._preload = _modules_of(learner)
        # self._done: (round, metrics, guidance tensors, samples) not swapped in yet

    # ------------------------------------------------------------------ the worker's life
    @property
    def pid(self) -> int | None:
        """The worker's process id (``None`` before the first round or after :meth:`close`)."""
        return None if self._process is None else self._process.pid

    def _ensure_started(self) -> None:
        """Spawn the worker (it imports what the learner needs while this process goes on); idempotent."""
        if self._process is not None:
            return
        if self._learner is None:
            raise RuntimeError("the guidance worker was closed; this schedule cannot run more rounds")
        import torch.multiprocessing as mp

        constraint = type(self._learner.constraint)
        if constraint.__module__ == "__main__":
            raise UserInputError(
                f"ConstrainedConfig.schedule='process': the constraint class {constraint.__name__} is defined in the "
                "script being run (__main__), which the guidance worker process does not import; move it to a "
                "module, or use schedule='parallel'"
            )
        context = mp.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        process = context.Process(
            target=_worker_main,
            args=(
                child_conn,
                self._preload,
                self.worker_threads,
                self.device,
                logging.getLogger("steer").getEffectiveLevel(),
            ),
            name="steer-guidance-worker",
            daemon=True,
        )
        main = sys.modules.get("__main__")
        try:
            # The worker must not run the user's script again (spawn re-imports __main__ by default: an unguarded
            # training script would start a second training, or join the process group, in the worker).
            sys.modules["__main__"] = types.ModuleType("__main__")
            process.start()
        finally:
            sys.modules["__main__"] = main
            child_conn.close()
        self._process, self._conn = process, parent_conn
        self._finalizer = weakref.finalize(self, _shutdown, process, parent_conn, False, 0.0)
        logger.info("guidance worker process %d started", process.pid)

    def _ship(self) -> None:
        """Send the learner to the worker (once); from then on it lives there only."""
        if self._learner is None:
            return
        try:
            payload = bytes(ForkingPickler.dumps((self._learner, self.policy_names)))
        except Exception as err:
            raise UserInputError(
                "ConstrainedConfig.schedule='process' sends the guidance learner (policy copy, guidance model, "
                f"tokenizer, constraint) to a worker process, and it could not be sent ({type(err).__name__}: "
                f"{err}); define the constraint at module level or use schedule='parallel'"
            ) from err
        self._request_bytes("learner", -1, payload)
        self._learner = None  # the worker owns it now (its frozen tensors stay shared with the policy)

    def _request(self, kind: str, index: int, payload: dict | None = None) -> None:
        self._request_bytes(kind, index, _dumps(payload or {}))

    def _request_bytes(self, kind: str, index: int, payload: bytes) -> None:
        try:
            self._conn.send((kind, index, payload))
        except (BrokenPipeError, OSError) as err:
            raise self._died(f"sending {kind!r}") from err

    def _died(self, what: str) -> GuidanceWorkerError:
        process = self._process
        if process is not None:
            process.join(1.0)
        code = None if process is None else process.exitcode
        return GuidanceWorkerError(
            f"the guidance worker process exited (exit code {code}) while {what}; its own error, if any, is in "
            "the log above (what the worker is sent, e.g. the constraint, must be importable from a module)"
        )

    def _receive(self, what: str) -> dict:
        """The worker's answer to the pending request: its payload, or the worker's error raised here."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                ready = self._conn.poll(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            except (EOFError, OSError) as err:
                raise self._died(what) from err
            if ready:
                try:
                    status, _index, payload = self._conn.recv()
                except (EOFError, OSError) as err:
                    raise self._died(what) from err
                break
            if not self._process.is_alive():
                if self._conn.poll(0):
                    continue  # it answered just before exiting
                raise self._died(what)
            if time.monotonic() >= deadline:
                self._kill()
                raise GuidanceWorkerError(
                    f"the guidance worker gave no answer within {self.timeout:.0f}s while {what}; it was stopped"
                )
        data = _loads(payload, None)
        if status == "ok":
            return data
        message = f"{what} failed in the guidance worker process ({data['type']}: {data['message']})"
        if data["round_error"]:
            raise GuidanceRoundError(data["message"])
        if data["user_error"]:
            raise UserInputError(data["message"])
        raise GuidanceWorkerError(
            f"{message}\nworker traceback:\n{data['traceback']}",
            worker_type=data["type"],
            worker_traceback=data["traceback"],
        )

    def _kill(self) -> None:
        self._stop(graceful=False)

    def _stop(self, *, graceful: bool) -> None:
        if self._process is not None:
            _shutdown(self._process, self._conn, graceful and self._running is None, self.stop_timeout)
            if self._finalizer is not None:
                self._finalizer.detach()
            self._process = self._conn = self._finalizer = None
            self._running = None
            if self.main_threads is not None:
                set_thread_share(self._original_threads)

    # ------------------------------------------------------------------ rounds
    def _collect(self) -> None:
        """Wait for the running round (if any) and keep its result for the next swap; re-raise its error."""
        if self._running is None:
            return
        round_index = self._running
        try:
            data = self._receive(f"guidance round {round_index}")
        except Exception as err:
            self._running = None
            self._threads_to_policy()
            self._failure = err
            self._failure_raised = True
            if self._process is not None and not self._process.is_alive():
                self._kill()
            logger.error(
                "%s; the policy keeps guidance version %d and training stops at the next step",
                (str(err).splitlines() or [f"guidance round {round_index} failed: {type(err).__name__}"])[0],
                self.version,
            )
            raise
        self._running = None
        self._threads_to_policy()
        self._done = _pending(round_index, data)

    def check(self) -> None:
        """Raise the error of a background round that failed (the trainer calls this before every step)."""
        if self._failure is None and self._running is not None:
            finished = False
            with contextlib.suppress(EOFError, OSError):
                finished = self._conn.poll(0)
            if finished or not self._process.is_alive():
                with contextlib.suppress(Exception):
                    self._collect()
                if self._failure is not None:
                    self._failure_raised = False
        self._raise_unraised_failure()

    def _swap(self) -> list[dict[str, float]]:
        if self._done is None:
            return []
        round_index, metrics, guidance, samples = self._done
        self._done = None
        self.samples = samples
        copy_tensors(self.guidance_params(), guidance)
        if self.sync_weights is not None:  # the next round start sends the averaged weights to the worker
            self.sync_weights(self.guidance_params())
        self.version = round_index
        return [metrics]

    def _start(self, round_index: int) -> None:
        if self._learner is not None and round_index == 0 and self.wait_warmup:
            self._ensure_started()  # the worker imports while the warm-up round (waited for) runs here
            self._run_here(round_index)
            return
        self._ensure_started()
        payload = {
            "policy": [p.detach().cpu() for p in self.policy_params()],
            "guidance": [p.detach().cpu() for p in self.guidance_params()],
        }
        try:
            self._ship()
            self._request("round", round_index, payload)
        except GuidanceWorkerError as err:  # the worker is gone: no round can run any more
            self._failure, self._failure_raised = err, True
            self._kill()
            raise
        self._running = round_index
        if self.main_threads is not None:
            set_thread_share(self.main_threads)

    def _run_here(self, round_index: int) -> None:
        """Run the warm-up round in this process (all its threads) on the learner, before it is shipped."""
        learner = self._learner
        named = dict(learner.policy.named_parameters())
        copy_tensors([named[n] for n in self.policy_names], [p.detach() for p in self.policy_params()])
        copy_tensors(learner.guidance.trainable_parameters(), [p.detach() for p in self.guidance_params()])
        self._done = _pending(round_index, _round_reply(learner, learner.run_round(round_index)))

    def _threads_to_policy(self) -> None:
        """No round in the worker: the policy takes every CPU thread again."""
        if self.main_threads is not None:
            set_thread_share(self._original_threads)

    def close(self) -> None:
        """Stop the worker and join it (terminated at once if a round is still running)."""
        self._stop(graceful=True)

    # ------------------------------------------------------------------ state
    def _learner_state(self) -> dict:
        if self._learner is not None:
            # not shipped yet: a copy, as the worker's would be (the learner's own tensors go to shared memory
            # when it is shipped)
            return copy.deepcopy(self._learner.state_dict())
        if self._process is None:
            if self._failure is not None:  # the worker died with its state
                raise self._failure
            raise RuntimeError("the guidance worker was closed: its state is gone")
        return self._receive_state()

    def _receive_state(self) -> dict:
        self._request("state", -1)
        return self._receive("reading the guidance learner's state")

    def state_dict(self) -> dict:
        # As ParallelSchedule: a finished round waits as 'pending'; a failed round is left out (the error is
        # raised at the next step). The learner's guidance is the pending round's, else the swapped-in version.
        try:
            self._collect()
        except Exception:  # noqa: BLE001 - kept in self._failure, raised by check() at the next step
            self._failure_raised = False
            if self._process is None and self._learner is None:
                self._failure_raised = True
                raise
        learner = self._learner_state()
        pending = None
        if self._done is not None:
            pending = {"round": self._done[0], "metrics": dict(self._done[1])}
            learner["guidance"] = [t.clone() for t in self._done[2]]
            learner["latest"] = SampleBuffer.items_state(self._done[3])
        else:
            learner["guidance"] = [p.detach().cpu().clone() for p in self.guidance_params()]
        return {
            "schedule": self.name,
            "version": self.version,
            "guidance": [p.detach().cpu().clone() for p in self.guidance_params()],
            "learner": learner,
            "pending": pending,
            "samples": SampleBuffer.items_state(self.samples),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_schedule(state, self.name)
        if self._running is not None:  # a round of the run being replaced: its result is not wanted
            with contextlib.suppress(Exception):
                self._collect()
        self._failure, self._failure_raised = None, False
        copy_tensors(self.guidance_params(), state["guidance"])
        if self._learner is not None:
            # not shipped yet; a copy, so that the caller's tensors never become shared
            self._learner.load_state_dict(copy.deepcopy(state["learner"]))
        elif self._process is None:
            raise RuntimeError("the guidance worker was closed; cannot load a state into it")
        else:
            self._request("load", -1, state["learner"])
            self._receive("loading the guidance learner's state")
        self.version = int(state["version"])
        self.samples = SampleBuffer.items_from_state(state.get("samples"))
        pending = state.get("pending")
        self._done = None
        if pending is not None:
            learner = state["learner"]
            self._done = (
                int(pending["round"]),
                dict(pending["metrics"]),
                [t.clone() for t in learner["guidance"]],
                SampleBuffer.items_from_state(learner.get("latest")),
            )
