"""The web page in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) with a WAV as
its fake microphone opens http://127.0.0.1:PORT/ of `moshi-jax serve --preset tiny --max-sessions 1`, talks
(Opus encoded by WebCodecs in the page, muxed by its ogg.js), hears the model and shows its text; a second
page waits for the slot meanwhile and gets in when the first one leaves. Writes a screenshot of the
conversation (conversation.png in the test's tmp dir)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed (.ci/run "
                                                                     "installs Debian's chromium)")
playwright_api = pytest.importorskip("playwright.sync_api")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # every wait is bounded (the warm-up compiles for ~30 s, longer on a busy machine)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 "--autoplay-policy=no-user-gesture-required"]


class ServerProcess:
    """`moshi-jax serve` in a subprocess; its log lines collected by a thread."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "moshi_jax.cli", "serve", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()  # notified on every new line and when the log ends
        self.ended = False
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self):
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line.rstrip())
                self.changed.notify_all()
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def wait_for(self, pattern: str) -> re.Match:
        """The first log line matching `pattern`, waiting (woken by each new line) at most TIMEOUT_S."""
        deadline = time.monotonic() + TIMEOUT_S
        seen = 0
        with self.changed:
            while True:
                for line in self.lines[seen:]:
                    if m := re.search(pattern, line):
                        return m
                seen = len(self.lines)
                assert not self.ended, "the server exited:\n" + "\n".join(self.lines[-20:])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {pattern!r} in the server log:\n"
                                         + "\n".join(self.lines[-20:]))
                self.changed.wait(timeout=left)

    def stop(self) -> int:
        self.proc.terminate()  # SIGTERM: the server closes its clients and exits
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _microphone_wav(path: Path) -> Path:
    import soundfile as sf

    from moshi_jax.data.speech_synth import synthesize

    audio = np.concatenate([synthesize(t, "en-us").audio for t in ("Hello there, how are you today?",
                                                                  "Tell me something about the weather.")])
    sf.write(path, audio, 24_000, subtype="PCM_16")  # Chromium loops it as the microphone
    return path


def _stats(page) -> dict:
    return page.evaluate("() => ({...window.moshiStats})")


def test_the_page_talks_with_moshi_jax_serve_and_a_second_page_waits_for_the_slot(tmp_path):
    wav = _microphone_wav(tmp_path / "mic.wav")
    server = ServerProcess("--preset", "tiny", "--port", "0", "--max-sessions", "1", "--idle-timeout", "20")
    try:
        with playwright_api.sync_playwright() as pw:  # the browser starts while the model warms up
            browser = pw.chromium.launch(executable_path=CHROMIUM,
                                         args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={wav}"])
            try:
                port = int(server.wait_for(r"serving on http://127\.0\.0\.1:(\d+)").group(1))
                base = f"http://127.0.0.1:{port}"
                first, second = browser.new_page(), browser.new_page()
                errors = []
                for page in (first, second):
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.set_default_timeout(TIMEOUT_S * 1000)
                first.goto(base + "/?text_seed=1&audio_seed=2&text_temperature=0.6")
                assert first.title() == "Moshi (moshi-jax)"
                first.click("#connect")
                first.wait_for_function("window.moshiStats.state === 'talking'")

                second.goto(base + "/")
                second.click("#connect")
                second.wait_for_function("window.moshiStats.state === 'waiting'")
                waiting_text = second.inner_text("#status-text")

                # both ways for a while: the page's Opus in, the model's audio and text out (12.5 / s each)
                first.wait_for_function("window.moshiStats.audioReceived >= 40 && window.moshiStats.textReceived >= 40")
                a = _stats(first)
                shown = first.inner_text("#text")
                first.screenshot(path=str(tmp_path / "conversation.png"))
                print(f"screenshot: {tmp_path / 'conversation.png'}")
                assert second.evaluate("window.moshiStats.state") == "waiting"  # still waiting meanwhile

                first.click("#disconnect")
                second.wait_for_function("window.moshiStats.state === 'talking'")
                second.wait_for_function("window.moshiStats.audioReceived >= 10")
                b = _stats(second)
                first_state = first.evaluate("window.moshiStats.state")
            finally:
                browser.close()
        left = server.wait_for(r"slot 0: client 1 left after (\d+) frames in, (\d+) out")
    finally:
        code = server.stop()
    log = "\n".join(server.lines)

    assert not errors, errors
    assert a["audioSent"] >= 100 and a["sentSeconds"] >= 2.0  # 20 ms Opus packets from WebCodecs
    assert a["receivedSeconds"] >= 3.0 and not a["errors"]
    assert a["text"] and shown == a["text"]  # the page shows exactly the text it received
    meta = a["metadata"]
    assert meta["text_seed"] == 1 and meta["audio_seed"] == 2 and meta["text_temperature"] == 0.6
    assert meta["model"] == "random tiny model (seed 0)"
    assert re.search(r"Waiting for a slot: position 1 of 1", waiting_text)
    assert b["queue"] is None and b["audioReceived"] >= 10 and b["textReceived"] >= 1
    assert first_state == "idle"
    assert int(left.group(1)) >= 40  # the server decoded the page's Ogg/Opus into whole frames
    assert "client 2 (127.0.0.1) waits for a slot: position 1 of 1" in log
    assert re.search(r"slot 0: client 2 \(127\.0\.0\.1\) admitted after waiting", log)
    assert code == 0 and (tmp_path / "conversation.png").stat().st_size > 10_000
