"""The compose deployments run as their files say, without a Docker engine.

What the image does is repeated on this machine: a fresh virtual environment gets
``pip install '.[rabbitmq,nats]'`` from a copy of exactly what the Dockerfile copies (so
a module left out of the package fails here as in the image), and ``examples/`` sits in
the working directory as in ``/app``. Then every service of ``docker compose config``
(the resolved file: anchors, environment, the signing key interpolated) runs as a process
with its own command and environment, the broker's host name pointed at the local
broker and a test prefix added to the URLs: two workers (``--scale worker=2``), the
listener and the producer. The producer must finish files and the listener must print
their partial results as they arrive.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import venv
from pathlib import Path

import pytest

from integration import nats_support, rabbitmq_support
from integration.processes import ROOT
from tests.test_compose import COMPOSE, compose_config

DEADLINE = 90.0
#: The image fixture installs the package into a new environment (up to 600 s), and
#: each service test waits for several services in turn.
pytestmark = pytest.mark.timeout(900)


def _copied_as_the_dockerfile_does(target: Path) -> None:
    """The build context's ``COPY`` lines, in a directory: what ``pip install .`` sees."""
    for line in (COMPOSE / "Dockerfile").read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, _destination = line.split()[1:]
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, target / source,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, target / source)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory standing for the image: ``.venv`` with the package installed (not
    editable) and the application directory with ``examples/``."""
    root = tmp_path_factory.mktemp("image")
    app = root / "app"
    app.mkdir()
    _copied_as_the_dockerfile_does(app)
    venv.create(root / "venv", with_pip=True)
    done = subprocess.run(
        [str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet",
         ".[rabbitmq,nats]"], cwd=app, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for package in ("qtasks", "brokers", "results"):
        shutil.rmtree(app / package)  # the installed copy must be the one that runs
    return root


class Service:
    """One service's process, its output read as it comes."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = DEADLINE) -> list[str]:
        """The first ``count`` lines matching ``pattern``; fails with the output."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(found := [x for x in self.lines if regex.search(x)]) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"{self.name}: no {count} x {pattern!r} in:\n"
                                         + "".join(self.lines[-40:]))
                self.changed.wait(min(left, 0.5))
        return found[:count]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def local(url: str, host: str, local_url: str, prefix: str) -> str:
    """The service's URL pointed at this machine's broker (its credentials, if any), in
    the test's namespace."""
    credentials = re.match(r"\w+://([^@/]*@)?", local_url)
    assert credentials is not None
    target, count = re.subn(rf"^(\w+://)([^@/]*@)?{host}:",
                            lambda m: m.group(1) + (credentials.group(1) or "") + "127.0.0.1:",
                            url)
    assert count == 1, f"{url} does not name the {host} service"
    return f"{target}{'&' if '?' in target else '?'}prefix={prefix}"


@pytest.mark.parametrize("broker", ["rabbitmq", "nats"])
def test_compose_services_run_as_configured(broker: str, image: Path, prefix: str,
                                            request: pytest.FixtureRequest) -> None:
    key = "compose-test-signing-key"
    config = compose_config(f"{broker}.yml", {"QTASKS_SIGNING_KEY": key})["services"]
    local_url: str = request.getfixturevalue(f"{broker}_url")  # only the broker under test
    bin_dir = image / "venv" / "bin"
    services: list[Service] = []
    try:
        def start(name: str) -> Service:
            spec = config[name]
            env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                   "HOME": os.environ.get("HOME", "/tmp"), "PYTHONUNBUFFERED": "1",
                   "PRODUCER_EVERY": "0.1"}
            env.update({k: str(v) for k, v in spec["environment"].items()})
            for var in ("QTASKS_BROKER_URL", "QTASKS_RESULTS_URL"):
                env[var] = local(env[var], broker, local_url, prefix)
            assert env["QTASKS_SIGNING_KEY"] == key
            service = Service(name, [str(x) for x in spec["command"]], env, image / "app")
            services.append(service)
            return service

        workers = [start("worker") for _ in range(2)]  # --scale worker=2
        for worker in workers:
            worker.wait_for("consuming")
        # The workers' healthcheck, as the container runs it (``$$`` is compose's ``$``):
        # this host's workers answer the ping, so it passes.
        kind, check = config["worker"]["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               "QTASKS_BROKER_URL": local(config["worker"]["environment"]["QTASKS_BROKER_URL"],
                                          broker, local_url, prefix),
               "QTASKS_SIGNING_KEY": key}
        healthy = subprocess.run(["sh", "-c", check.replace("$$", "$")], env=env,
                                 cwd=image / "app", capture_output=True, text=True, timeout=60)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        listener = start("listener")
        listener.wait_for("listening to")
        producer = start("producer")
        finished = producer.wait_for(r"file-\d+: success, checksum [0-9a-f]{12}", count=3)
        assert [line.split(":")[0] for line in finished] == ["file-1", "file-2", "file-3"]
        assert len(producer.wait_for(r"\+\d+\.\d+s \{'chunk': \d\}", count=15)) == 15
        listener.wait_for(r"process_file .*partial", count=5)
        listener.wait_for(r"checksum .*success", count=1)
        assert all(w.proc.poll() is None for w in workers)
    finally:
        for service in services:
            service.stop()
        support = rabbitmq_support if broker == "rabbitmq" else nats_support
        support.delete_namespace_sync(local_url, prefix)


def test_the_image_runs_the_installed_package(image: Path) -> None:
    """The package in the image's environment is the installed one, with its script."""
    python = image / "venv" / "bin" / "python"
    done = subprocess.run([str(python), "-c", "import qtasks, qtasks.brokers.rabbitmq, "
                           "qtasks.brokers.nats, qtasks.results.rabbitmq, "
                           "qtasks.results.nats; print(qtasks.__file__)"],
                          cwd=image / "app", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(image / "venv")) and "site-packages" in done.stdout
    assert (image / "venv" / "bin" / "qtasks").exists()
