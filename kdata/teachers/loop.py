"""The default executor of a build's event loop (`LoopExecutor`)."""

from __future__ import annotations

import inspect
import weakref
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import Any


class LoopExecutor(ThreadPoolExecutor):
    """The default executor of a build's event loop: it closes what a cancelled job returns.

    litellm's ``acompletion`` builds the provider's request coroutine in an executor thread and
    then awaits it. A request cancelled in between (Ctrl+C) leaves that coroutine unstarted, so
    nothing was sent, and Python warns that it was never awaited when it is collected; here a
    job whose waiter is gone has a coroutine it returns closed instead. A request cancelled
    just after its job finished, before it awaited the coroutine, leaves one too: the loop's
    shutdown closes every coroutine a job returned that nobody started.
    """

    def __init__(self) -> None:
        super().__init__()
        self._returned: weakref.WeakSet = weakref.WeakSet()  # coroutines jobs handed out

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return _Job(super().submit(fn, *args, **kwargs), self._returned)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        for coro in list(self._returned):
            _close_unstarted(coro)


class _Job(Future):
    """A future over an executor job; asyncio cancels it only when its waiter was cancelled."""

    def __init__(self, inner: Future, returned: weakref.WeakSet) -> None:
        super().__init__()
        self._inner, self._returned = inner, returned
        inner.add_done_callback(self._settle)

    def cancel(self) -> bool:
        self._inner.cancel()  # a job not started yet never runs
        if super().cancel():
            return True
        if self.exception() is None:  # it finished first: nobody will take its result now
            _close_unstarted(self.result())
        return False

    def _settle(self, inner: Future) -> None:
        if inner.cancelled():
            super().cancel()
            return
        try:
            if inner.exception() is not None:
                self.set_exception(inner.exception())
            else:
                if inspect.iscoroutine(inner.result()):
                    self._returned.add(inner.result())
                self.set_result(inner.result())
        except InvalidStateError:  # cancelled while it ran
            if inner.exception() is None:
                _close_unstarted(inner.result())


def _close_unstarted(value: Any) -> None:
    if inspect.iscoroutine(value) and inspect.getcoroutinestate(value) == inspect.CORO_CREATED:
        value.close()
