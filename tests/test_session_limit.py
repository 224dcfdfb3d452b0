"""FEDMERGE_MAX_SESSIONS on the real app (shipped zoo, gradio_client): a new session closes the least recently
used idle one, frees its model, and that session's next request says why; a session at work on a long job is
never closed; a full server whose sessions are all at work refuses a new one with one line."""
from __future__ import annotations

import gc
import time
import weakref

import pytest

from evaluation.playground import live_kwargs
from evaluation.session import SESSIONS

TWO = dict(selection=["reverse", "upper"], weights=[1.0, 1.0], prompts="reverse: abc=")


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def live(c, **kw):
    return c.predict(**live_kwargs(**{**TWO, **kw}), api_name="/live")


def opened(url):
    """A new gradio_client session that merged once, and the server's Session it opened."""
    before = set(SESSIONS.sessions())
    c = client(url)
    *_, status, data = live(c)
    assert data["rows"][0][-1] == "✓ cba", status
    new = [s for s in SESSIONS.sessions() if s not in before]
    assert len(new) == 1, new
    return c, new[0]


def refused(c, **kw) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        live(c, **kw)
    text = str(info.value)
    assert "Traceback" not in text and "Error(" not in text and "/" not in text, text
    return text


def wait_busy(session, timeout: float = 30) -> None:
    t0 = time.time()
    while not session.busy and time.time() - t0 < timeout:
        time.sleep(0.02)
    assert session.busy


def test_a_new_session_closes_the_least_recently_used_idle_one(shipped_url, monkeypatch):
    monkeypatch.setenv("FEDMERGE_MAX_SESSIONS", "2")
    a, sa = opened(shipped_url)
    b, sb = opened(shipped_url)
    live(a)  # a used again: b is now the least recently used
    model = weakref.ref(sb.merge.model)
    c, sc = opened(shipped_url)
    assert SESSIONS.sessions() == [sa, sc] and len(SESSIONS.sessions()) == 2
    assert sb.closed and sb.merge is None and sb.pool is None and sb.scorer is None
    gc.collect()
    assert model() is None  # its merged model is gone from memory, not only from the session
    text = refused(b)
    assert text == ("this session was closed to make room for other visitors (this server holds at most 2); "
                    "reload the page to start a new one")
    assert sb not in SESSIONS.sessions()  # its refused request opened nothing
    for x in (a, c):  # the others merge on
        *_, data = live(x, lam=0.0)
        assert data["rows"][0][-1] == data["rows"][0][2]  # λ = 0: the base's answer


def test_a_session_at_work_is_kept(shipped_url, monkeypatch):
    monkeypatch.setenv("FEDMERGE_MAX_SESSIONS", "2")
    b, sb = opened(shipped_url)
    c, sc = opened(shipped_url)
    job = b.submit(["task_arithmetic", "ties", "dare_ties", "median", "fedgma"], api_name="/heterogeneity")
    wait_busy(sb)  # b's long job runs
    live(c)  # c used after b's job began: b is the least recently used, but at work
    d, sd = opened(shipped_url)
    assert sc.closed and not sb.closed and sb.busy, "the idle session makes room, not the one at work"
    assert set(SESSIONS.sessions()) == {sb, sd}
    assert "closed to make room" in refused(c)
    fig, md = job.result(timeout=300)  # b's job was not disturbed
    assert "Spearman" in md and not sb.busy and not sb.closed


def test_a_full_server_refuses_a_new_session(shipped_url, monkeypatch):
    monkeypatch.setenv("FEDMERGE_MAX_SESSIONS", "1")
    b, sb = opened(shipped_url)  # the others, idle, made room for it
    assert SESSIONS.sessions() == [sb]
    job = b.submit(["task_arithmetic", "ties"], api_name="/heterogeneity")
    wait_busy(sb)
    e = client(shipped_url)
    text = refused(e)
    assert text == "the server is full: every open session is at work (at most 1 at once); try again in a minute"
    assert SESSIONS.sessions() == [sb] and sb.busy and not sb.closed  # nothing opened, nothing closed
    # the refused page's next action (a checkbox): one line, not an internal error
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=r"^this page has no session on the server \(it ended, or the server was full "
                                       r"when the page loaded\); reload the page$"):
        e.predict(["reverse"], api_name="/on_select")
    fig, md = job.result(timeout=300)
    assert "Spearman" in md
    _, se = opened(shipped_url)  # b is idle now: it makes room
    assert sb.closed and SESSIONS.sessions() == [se]
    assert "closed to make room" in refused(b)
