"""Stores on object storage through the real protocols: S3 (moto's server, with credentials
checked) and GCS (gcp-storage-emulator), each a local server on 127.0.0.1 started here and
stopped at the end of the module. Copy, info, verify and training from s3:// and gs:// with the
endpoint and credentials given the way s3fs/gcsfs users give them; an interrupted copy is never
a store; a missing bucket or bad credentials is one line (docs/design.md, checklist item 5)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import run_cli
from http_server import StaticServer
from helpers import one_error_line
from test_sharing import local_states

BUCKET = "lab"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, corpus):
    """A float32 store in shards of 256 frames (about 10 shard files), so a copy is many PUTs."""
    from cachegen.build import BuildConfig, build_cache

    out = tmp_path_factory.mktemp("objects") / "s.zarr"
    summary = build_cache(BuildConfig(manifest=corpus, out=str(out), model=tiny_model, layers=2,
                                      dtype="float32", shard_frames=256, chunk_frames=64,
                                      batch_size=8, progress=False))
    assert not summary.failed and len(list((out / "states" / "c").rglob("*"))) >= 8
    return str(out)


TRAIN = ("--top-layers", 2, "--epochs", 1, "--batch-size", 4, "--dropout", 0, "--warmup", 0,
         "--seed", 3, "--workers", 1, "--no-progress")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with IAM checks on: one user whose key may use S3, one
    bucket. Returns (endpoint, key id, secret)."""
    pytest.importorskip("s3fs", reason="the test extra installs ser[s3]")
    boto3 = pytest.importorskip("boto3", reason="the test extra installs moto[server]")

    folder = tmp_path_factory.mktemp("moto")
    server = StaticServer(folder, module="moto.server", args=("-H", "127.0.0.1", "-p", "{port}"),
                          lifetime=600, timeout=60)
    try:
        setup = dict(endpoint_url=server.url, aws_access_key_id="setup", aws_secret_access_key="setup",
                     region_name="us-east-1")
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="ser")
        iam.put_user_policy(UserName="ser", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="ser")["AccessKey"]
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        # from now on every request must be signed by a known key with the right secret
        urllib.request.urlopen(urllib.request.Request(
            f"{server.url}/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"}), timeout=10).read()
        yield server.url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.stop()


def aws_environment(endpoint: str, key: str, secret: str) -> dict:
    """What an s3fs user exports for an S3-compatible endpoint (MinIO, Ceph, moto)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No AWS settings of the machine, fresh fsspec instances and configuration per test."""
    import fsspec.config

    s3fs = pytest.importorskip("s3fs", reason="the test extra installs ser[s3]")

    for name in [n for n in os.environ if n.startswith(("AWS_", "FSSPEC_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(fsspec.config, "conf", copy.deepcopy(fsspec.config.conf))
    s3fs.S3FileSystem.clear_instance_cache()
    yield monkeypatch
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def aws(s3, isolated):
    """The environment of a user whose credentials are good."""
    for name, value in aws_environment(*s3).items():
        isolated.setenv(name, value)
    return s3


def test_copy_info_verify_and_train_from_s3_equal_disk(aws, store, tmp_path):
    url = f"s3://{BUCKET}/stores/f32.zarr"
    result = run_cli("cache", "copy", store, url)
    assert result.exit_code == 0 and "verified: 24 utterances" in result.output, result.output
    assert local_states(url) == local_states(store)

    local = json.loads(run_cli("cache", "info", store, "--json").stdout)
    result = run_cli("cache", "info", url, "--json")
    assert result.exit_code == 0, result.output
    remote = json.loads(result.stdout)
    assert remote["store"] == url and remote["bytes"] == local["bytes"] and remote["files"] == local["files"]
    assert {k: v for k, v in remote.items() if k not in ("store", "source")} == {
        k: v for k, v in local.items() if k not in ("store", "source")}
    result = run_cli("cache", "verify", url)
    assert result.exit_code == 0 and "ok (24 utterances" in result.output
    one_error_line(run_cli("cache", "copy", store, url), "already holds a store")

    cache = tmp_path / "cache"
    assert run_cli("train", "--from-cache", store, "--out", tmp_path / "disk", *TRAIN).exit_code == 0
    result = run_cli("train", "--from-cache", url, "--cache-dir", cache, "--out", tmp_path / "s3", *TRAIN)
    assert result.exit_code == 0, result.output
    disk, remote = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("disk", "s3"))
    assert disk.keys() == remote.keys() and all(disk[k].equal(remote[k]) for k in disk)
    cached = {p.relative_to(next(cache.iterdir())).as_posix() for p in cache.rglob("*") if p.is_file()}
    assert "zarr.json" in cached and any(k.startswith("states/c/") for k in cached)


def test_storage_options_give_endpoint_and_credentials(s3, isolated, store):
    endpoint, key, secret = s3
    url = f"s3://{BUCKET}/stores/options.zarr"
    options = json.dumps({"s3": {"endpoint_url": endpoint, "key": key, "secret": secret,
                                 "client_kwargs": {"region_name": "us-east-1"}}})
    result = run_cli("cache", "copy", store, url, "--storage-options", options)
    assert result.exit_code == 0, result.output
    result = run_cli("cache", "verify", url, "--storage-options", options)
    assert result.exit_code == 0 and "ok (24 utterances" in result.output
    wrong = json.dumps({"s3": {"endpoint_url": endpoint, "key": key, "secret": "not-the-secret"}})
    one_error_line(run_cli("cache", "info", url, "--storage-options", wrong), url)
    one_error_line(run_cli("cache", "info", url, "--storage-options", "{not json"), "--storage-options")
    one_error_line(run_cli("cache", "info", url, "--storage-options", '{"endpoint_url": "x"}'),
                   "--storage-options", '"s3"')


def test_killed_copy_to_s3_is_never_a_store_and_resumes(aws, store, tmp_path):
    """SIGKILL in the middle of a copy (after a few PUTs): no zarr.json, so nothing opens it as a
    store; the same command again copies only what is missing and publishes it."""
    import s3fs

    url = f"s3://{BUCKET}/stores/killed.zarr"
    kill_after_5_files = (
        "import os, signal, sys\n"
        "from cachegen import share\n"
        "real, done = share.FsspecTarget.write, []\n"
        "def write(self, key, data):\n"
        "    if len(done) == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(self, key, data)\n"
        "    done.append(key)\n"
        "share.FsspecTarget.write = write\n"
        "from cli import main\n"
        "main(['cache', 'copy', sys.argv[1], sys.argv[2], '--jobs', '1'])\n")
    process = subprocess.run([sys.executable, "-c", kill_after_5_files, store, url],
                             cwd=Path(__file__).parents[1], capture_output=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()[-2000:]
    left = s3fs.S3FileSystem().find(f"{BUCKET}/stores/killed.zarr")
    assert len([k for k in left if "/states/c/" in k]) >= 1 and not any(k.endswith("/zarr.json") and
                                                                       "/states/" not in k for k in left)
    one_error_line(run_cli("cache", "info", url), url, "no zarr.json")
    one_error_line(run_cli("train", "--from-cache", url, "--out", tmp_path / "r", *TRAIN), "no zarr.json")

    result = run_cli("cache", "copy", store, url)
    assert result.exit_code == 0 and "were already copied by an earlier run" in result.output, result.output
    assert local_states(url) == local_states(store)
    assert run_cli("cache", "verify", url).exit_code == 0


def test_missing_bucket_and_bad_credentials_are_one_line(s3, isolated, store, tmp_path):
    endpoint, key, secret = s3
    for name, value in aws_environment(endpoint, key, secret).items():
        isolated.setenv(name, value)
    assert run_cli("cache", "copy", store, f"s3://{BUCKET}/stores/auth.zarr").exit_code == 0
    missing = "s3://no-such-bucket/x.zarr"
    one_error_line(run_cli("cache", "info", missing), missing)
    one_error_line(run_cli("cache", "copy", store, missing), missing)
    one_error_line(run_cli("train", "--from-cache", missing, "--out", tmp_path / "r", *TRAIN), missing)

    url = f"s3://{BUCKET}/stores/auth.zarr"
    for wrong_key, wrong_secret in ((key, "not-the-secret"), ("AKIAUNKNOWNKEY000000", secret)):
        isolated.setenv("AWS_ACCESS_KEY_ID", wrong_key)
        isolated.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        one_error_line(run_cli("cache", "info", url), url)
        one_error_line(run_cli("cache", "verify", url, "--cache-dir", tmp_path / "c"), url)
        one_error_line(run_cli("cache", "copy", store, f"s3://{BUCKET}/stores/denied.zarr"),
                       f"s3://{BUCKET}/stores/denied.zarr")
        one_error_line(run_cli("train", "--from-cache", url, "--cache-dir", tmp_path / "c",
                               "--out", tmp_path / "r", *TRAIN), url)


def test_the_s3_server_listens_on_loopback_only(s3):
    """Nothing outside this machine can reach the test server (nor its account)."""
    import socket

    port = int(s3[0].rsplit(":", 1)[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # picks the outward interface; sends nothing
            address = probe.getsockname()[0]
        except OSError:
            pytest.skip("this machine has no network interface besides loopback")
    if address.startswith("127."):
        pytest.skip("this machine has no network interface besides loopback")
    with pytest.raises(OSError):
        socket.create_connection((address, port), timeout=2).close()


# --- Google Cloud Storage --------------------------------------------------------------------

@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """gcp-storage-emulator on 127.0.0.1 with one bucket (it checks no credentials)."""
    from importlib.util import find_spec

    for module, package in (("gcsfs", "ser[gs]"), ("gcp_storage_emulator", "gcp-storage-emulator")):
        if find_spec(module) is None:  # found, not imported: gcsfs reads a switch at import
            pytest.skip(f"the test extra installs {package}")
    folder = tmp_path_factory.mktemp("gcs")
    server = StaticServer(folder, module="gcp_storage_emulator",
                          args=("start", "-H", "127.0.0.1", "--port", "{port}", "--in-memory",
                                "--default-bucket", BUCKET), lifetime=600, timeout=60)
    yield server.url
    server.stop()


@pytest.fixture
def gcs_user(gcs, isolated):
    """What a gcsfs user sets for an emulator: its host, anonymous access, and plain HTTP
    (gcsfs's experimental gRPC bucket probe does not talk to emulators)."""
    isolated.setenv("STORAGE_EMULATOR_HOST", gcs)
    isolated.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    if "gcsfs" in sys.modules:  # the switch above is read when gcsfs is imported
        assert sys.modules["gcsfs"].GCSFileSystem.__name__ == "GCSFileSystem"
    return json.dumps({"gs": {"token": "anon"}})


def test_copy_verify_and_train_from_gcs_equal_disk(gcs_user, store, tmp_path):
    url = f"gs://{BUCKET}/stores/f32.zarr"
    options = ("--storage-options", gcs_user)
    result = run_cli("cache", "copy", store, url, *options)
    assert result.exit_code == 0 and "verified: 24 utterances" in result.output, result.output
    result = run_cli("cache", "info", url, "--json", *options)
    assert result.exit_code == 0 and json.loads(result.stdout)["utterances"] == 24
    assert run_cli("cache", "verify", url, *options).exit_code == 0
    assert run_cli("train", "--from-cache", store, "--out", tmp_path / "disk", *TRAIN).exit_code == 0
    result = run_cli("train", "--from-cache", url, "--cache-dir", tmp_path / "cache", "--out", tmp_path / "gs",
                     *TRAIN, *options)
    assert result.exit_code == 0, result.output
    disk, remote = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("disk", "gs"))
    assert disk.keys() == remote.keys() and all(disk[k].equal(remote[k]) for k in disk)
    missing = "gs://no-such-bucket/x.zarr"
    one_error_line(run_cli("cache", "info", missing, *options), missing)
    one_error_line(run_cli("cache", "copy", store, missing, *options), missing)


# --- the extras -------------------------------------------------------------------------------

def test_the_extras_install_what_the_docs_say():
    """`pip install 'ser[s3]'` / `'ser[gs]'` bring the backend the URL needs, http(s) needs no
    extra, the test extra installs them all (so the tests above exercise them), and README.md
    and docs/sharing.md name those commands."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    needed = {"s3": "s3fs", "gs": "gcsfs"}
    requirements = [Requirement(line) for line in requires("ser") or []]
    core = {r.name for r in requirements if r.marker is None}
    assert "aiohttp" in core and "fsspec" in core  # http(s):// after a plain install
    for extra, package in needed.items():
        given = [r for r in requirements if r.marker and r.marker.evaluate({"extra": extra})]
        assert package in {r.name for r in given}, extra
        for requirement in given:
            assert requirement.specifier.contains(version(requirement.name), prereleases=True)
    tested = [r for r in requirements if r.name == "ser"]
    assert any({"s3", "gs", "http"} <= r.extras and r.marker.evaluate({"extra": "test"}) for r in tested)
    docs = (Path(__file__).parents[1] / "docs" / "sharing.md").read_text()
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert all(f"'ser[{extra}]'" in docs and f"'ser[{extra}]'" in readme for extra in needed)


def test_cloud_url_without_its_backend_names_the_extra(tmp_path):
    """Without s3fs (as after a plain `pip install ser`), an s3:// URL names the extra."""
    hide = "import sys; sys.modules['s3fs'] = None; from cli import main; main(sys.argv[1:])"
    process = subprocess.run([sys.executable, "-c", hide, "cache", "info", "s3://bucket/x.zarr"],
                             cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines()[-1].startswith("ser: error: s3://bucket/x.zarr")
    assert "pip install 'ser[s3]'" in process.stderr
