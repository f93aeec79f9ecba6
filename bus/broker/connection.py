"""Connecting to NATS the way a long-running service should: reconnect forever,
survive any subject a peer publishes, notice a client that stopped reading, log in
with the configured credentials (bus/auth), and say plainly when a login or a
permission is refused."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from typing import Any, Iterator

import anyio
import nats.errors
from nats.aio.client import Client

from bus.auth.credentials import Credentials
from storage.tasks import stop_task
from wire.errors import ErrorCode, LamaError

log = logging.getLogger("lamabus.bus")

#: The longest a refused first connect is waited for after its cancel (seconds).
CONNECT_STOP_TIMEOUT = 5.0

_VIOLATION = re.compile(r"Permissions Violation for (Publish|Subscription) to \"([^\"]*)\"", re.IGNORECASE)
#: What nats-server says when it refuses or ends a login (-ERR ...).
_AUTH_REFUSED = ("authorization violation", "authentication expired", "authentication revoked",
                 "authentication timeout", "user authentication", "account authentication expired")
#: OpenSSL's words for a chain that only VERIFY_X509_STRICT (RFC 5280 profile checks) refuses.
_NOT_RFC5280 = ("key identifier", "not marked critical", "does not include key usage")
_USERINFO = re.compile(r"(?<=://)[^@/,]*@")


def redact_url(url: str) -> str:
    """``nats://user:secret@host`` -> ``nats://***@host``: URLs go into logs and errors, secrets must not."""
    return _USERINFO.sub("***@", url)


class Denials:
    """Permission violations the broker reported on this connection, handed to whoever waits on that subject.

    nats-server answers a publish or subscription it does not permit with an asynchronous
    ``-ERR 'Permissions Violation for Publish to "<subject>"'`` and nothing else: a request would
    only time out. A caller watches the subjects it is about to use (:meth:`watching`) and gets a
    ``forbidden`` :class:`LamaError` as soon as the broker says so. (nats-py lowercases the server's
    error line, so subjects are matched without regard to case and reported as the caller wrote them.)"""

    def __init__(self) -> None:
        self._waiters: dict[str, dict[asyncio.Future[LamaError], str]] = {}

    @staticmethod
    def _error(operation: str, subject: str) -> LamaError:
        verb = "publish to" if operation == "publish" else "subscribe to"
        return LamaError(ErrorCode.FORBIDDEN, f"forbidden: this login may not {verb} {subject}",
                         subject=subject, operation=operation)

    def report(self, exc: BaseException) -> LamaError | None:
        """The violation ``exc`` (an error nats-py passed to its error callback) stands for, if it is one."""
        m = _VIOLATION.search(str(exc))
        if m is None:
            return None
        operation, subject = m.group(1).lower(), m.group(2)
        for fut, written in list(self._waiters.get(subject.lower(), {}).items()):
            if not fut.done():
                fut.set_result(self._error(operation, written))
        return self._error(operation, subject)

    @contextlib.contextmanager
    def watching(self, *subjects: str) -> Iterator[asyncio.Future[LamaError]]:
        """A future that resolves to the ``forbidden`` error of the first violation on one of ``subjects``."""
        fut: asyncio.Future[LamaError] = asyncio.get_running_loop().create_future()
        for s in subjects:
            self._waiters.setdefault(s.lower(), {})[fut] = s
        try:
            yield fut
        finally:
            for s in subjects:
                waiting = self._waiters.get(s.lower())
                if waiting is not None:
                    waiting.pop(fut, None)
                    if not waiting:
                        del self._waiters[s.lower()]


async def guarded(nc: Client, subjects: tuple[str, ...], work: Any) -> Any:
    """Await ``work`` (a coroutine using ``subjects``), or raise ``forbidden`` as soon as the broker refuses
    one of them. On a client without :class:`Denials` (a plain nats-py one), just await ``work``."""
    denials: Denials | None = getattr(nc, "denials", None)
    if denials is None:
        return await work
    with denials.watching(*subjects) as refused:
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, refused}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise refused.result()


def refusal(exc: BaseException) -> str | None:
    """Why a login failed, when ``exc`` says the broker refused it (or its certificate was not trusted)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason
        if any(marker in str(why).lower() for marker in _NOT_RFC5280):
            # Python 3.13 verifies with VERIFY_X509_STRICT: a chain 3.11 accepted can fail here with the right CA.
            return (f"the broker's TLS certificate chain is not valid under strict RFC 5280 checks ({why}), "
                    "which Python 3.13 applies; reissue the certificates with subject and authority key "
                    "identifiers and a critical key usage on the CA")
        return (f"the broker's TLS certificate is not trusted ({why}); "
                "set nats_tls_ca (--nats-tls-ca) to the CA that signed it")
    if isinstance(exc, ssl.SSLError):
        return (f"the TLS handshake failed ({exc.reason or exc}); if the broker wants a client certificate, "
                "set nats_tls_cert and nats_tls_key")
    if isinstance(exc, nats.errors.AuthorizationError):
        return "the broker refused the login (Authorization Violation)"
    text = str(exc)
    if any(marker in text.lower() for marker in _AUTH_REFUSED):
        return f"the broker refused the login ({text.removeprefix('nats: ').strip(chr(39))})"
    return None


class TolerantClient(Client):
    """nats-py's client, except that

    * a subject or reply that is not UTF-8 is decoded with replacement characters instead of raising.
      nats-py 2.16 decodes them strictly inside its read loop; the ``UnicodeDecodeError``
      ends that loop while the client still reports itself connected, so one peer that
      publishes ``lama.topic.bad\\xff.cancel`` would leave every subscription of the
      process deaf (reported upstream as a bug). With replacement characters the message
      arrives, its topic token is not a valid topic id, and it gets the usual coded answer.
    * a login the broker ends while connected (a revoked or expired credential) is a lost connection
      to retry, as for a broker that went away, when ``keep_trying``: nats-py would close for good.
    * permission violations reach waiting callers through :attr:`denials`.
    """

    keep_trying = False

    def __init__(self) -> None:
        super().__init__()
        self.denials = Denials()

    def _build_message(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> Any:
        return self.msg_class(subject=subject.decode(errors="replace"), reply=reply.decode(errors="replace"),
                              data=data, headers=headers, _client=self, _sid=sid)

    async def _process_connect_init(self) -> None:
        # A login refused while reconnecting leaves nats-py's transport open (it makes a new one for the next
        # try): close it, or every retry of a revoked credential leaks a socket until the collector finds it.
        try:
            await super()._process_connect_init()
        except BaseException:
            if self._transport is not None:
                with contextlib.suppress(Exception):
                    self._transport.close()
            raise

    async def _process_err(self, err_msg: str) -> None:
        if self.keep_trying and self.is_connected and refusal(nats.errors.Error(err_msg)) is not None:
            err = nats.errors.Error(f"nats: {err_msg.strip(chr(39))}")
            self._err = err
            await self._error_cb(err)
            await self._process_op_err(err)  # reconnects, and keeps trying while the login is refused
            return
        await super()._process_err(err_msg)


async def connect(url: str, *, name: str = "lamabus", reconnect_forever: bool = True,
                  credentials: Credentials | None = None) -> Client:
    """Connect with ``credentials``. A refused login or an untrusted certificate on the first connect raises
    ``unauthorized`` naming the setting to fix (a service that retried forever would hide it); once
    connected, ``reconnect_forever`` retries a lost broker and a refused login alike."""
    credentials = credentials or Credentials()
    nc = TolerantClient()
    nc.keep_trying = reconnect_forever
    shown = redact_url(url)
    refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    connected_once = False
    login_refused_logged = False

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):  # our own close is no news
            log.warning("disconnected from %s; reconnecting", shown)

    async def on_reconnect() -> None:
        nonlocal login_refused_logged
        login_refused_logged = False
        log.info("reconnected to %s", shown)

    async def on_error(exc: Exception) -> None:
        nonlocal login_refused_logged
        if (denied := nc.denials.report(exc)) is not None:
            log.log(logging.WARNING if reconnect_forever else logging.DEBUG, "%s", denied.message)
            return
        why = refusal(exc)
        if why is not None and not connected_once:
            if not refused.done():
                refused.set_result(why)
            return
        if why is not None:
            # Revoked or expired while running: say it once, keep retrying (an operator may restore it).
            if not login_refused_logged:
                login_refused_logged = True
                log.error("NATS at %s: %s, with %s; retrying", shown, why, credentials.describe())
            return
        # A client that gives up after a few tries reports the failure itself, once.
        log.log(logging.WARNING if reconnect_forever else logging.DEBUG, "nats error: %s", exc)

    # ``nats://a:4222,nats://b:4222``: the servers of a cluster, tried in the order given (the client also
    # learns the others from the server it reaches).
    servers = [u.strip() for u in url.split(",") if u.strip()]
    options = credentials.connect_options(url)
    connecting = asyncio.ensure_future(nc.connect(
        servers,
        name=name,
        dont_randomize=True,
        max_reconnect_attempts=-1 if reconnect_forever else 3,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        error_cb=on_error,
        **options,
    ))
    try:
        await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        connecting.cancel()
        raise
    if refused.done():
        # nats-py's connect waits with asyncio.wait_for, which on 3.11 can swallow a cancel: bounded.
        await stop_task(connecting, timeout=CONNECT_STOP_TIMEOUT, what=f"the refused connect to {shown}", log=log)
        with contextlib.suppress(Exception):
            await nc.close()
        raise LamaError(ErrorCode.UNAUTHORIZED, f"cannot log in to NATS at {shown} with {credentials.describe()}: "
                        f"{refused.result()}", url=shown)
    connecting.result()
    connected_once = True
    return nc


async def wait_until_deaf(nc: Client, *, interval: float = 5.0, timeout: float = 5.0, misses: int = 3) -> None:
    """Return once ``nc`` claims to be connected but has stopped reading from the server.

    Every ``interval`` the client sends a message to a subject only it subscribes to; if
    that echo does not come back through its own read loop ``misses`` times in a row
    while the client says it is connected, the read loop is gone and nothing it
    subscribed to will be delivered again. (``flush`` cannot tell: nats-py answers it
    without a round trip once its read loop has ended.) While the client is
    reconnecting, nats-py is already on it, so that does not count.
    """
    echoed = anyio.Event()

    async def on_echo(_msg: Any) -> None:
        echoed.set()

    subject = nc.new_inbox()
    sub = await nc.subscribe(subject, cb=on_echo)
    try:
        missed = 0
        while True:
            await anyio.sleep(interval)
            if not nc.is_connected:
                missed = 0
                continue
            echoed = anyio.Event()
            try:
                await nc.publish(subject, b"")
            except Exception:  # disconnected in between: nats-py reconnects
                continue
            with anyio.move_on_after(timeout):
                await echoed.wait()
            if echoed.is_set() or not nc.is_connected:
                missed = 0
                continue
            missed += 1
            log.warning("the broker's echo did not come back (%d of %d)", missed, misses)
            if missed >= misses:
                return
    finally:
        with anyio.CancelScope(shield=True):
            try:
                await sub.unsubscribe()
            except Exception:
                pass
