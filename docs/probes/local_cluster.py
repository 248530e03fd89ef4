# Probe / harness: a three-node RabbitMQ cluster on localhost, beside (never joined to) the
# machine's own broker rabbit@localhost (5672, 15672, 15692, 25672), for issue 14.
#
#   python docs/probes/local_cluster.py start   # start rk1..rk3, cluster them, leave them up
#   python docs/probes/local_cluster.py stop    # stop all three, remove their directory
#   python docs/probes/local_cluster.py check   # start, prove each node works, stop (default)
#
# The nodes run as the `rabbitmq` user (this script must run as root or as rabbitmq), so they
# share the Erlang cookie /var/lib/rabbitmq/.erlang.cookie with the CLI tools. Each node has
# its own node name, AMQP / management / prometheus / distribution ports, config file, data,
# log and enabled-plugins files, all under one directory (RK_CLUSTER_DIR, default
# /tmp/rabbitkeys-cluster) owned by rabbitmq; /etc/rabbitmq/rabbitmq-env.conf (which sets
# NODENAME=rabbit@localhost) is replaced by an empty per-node one. Everything listens on
# 127.0.0.1 only. Stdlib only, plus aio_pika for the final check.
import argparse
import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BASE = Path(os.environ.get("RK_CLUSTER_DIR", "/tmp/rabbitkeys-cluster"))
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
RABBIT_HOME = "/var/lib/rabbitmq"  # HOME of the rabbitmq user: holds .erlang.cookie
RUN_AS = "rabbitmq"
NODES = [
    {
        "name": f"rk{i}@localhost",
        "short": f"rk{i}",
        "amqp": 5680 + i,
        "management": 15680 + i,
        "prometheus": 15790 + i,
        "dist": 25680 + i,
    }
    for i in (1, 2, 3)
]
PORT_KEYS = ("amqp", "management", "prometheus", "dist")
# Ports of the machine's own broker: a collision (e.g. management on 15692) crashes a node.
RESERVED = {4369, 5672, 15672, 15692, 25672}
PLUGINS = "[rabbitmq_management,rabbitmq_prometheus].\n"
START_TIMEOUT = 120  # seconds, per await_startup


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def as_rabbitmq(cmd: list[str]) -> list[str]:
    """Prefix `cmd` so that it runs as the rabbitmq user."""
    if os.geteuid() == pwd.getpwnam(RUN_AS).pw_uid:
        return cmd
    if os.geteuid() != 0:
        sys.exit(f"run this as root or as {RUN_AS} (the nodes must share its Erlang cookie)")
    return ["runuser", "-u", RUN_AS, "--", *cmd]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env["HOME"] = RABBIT_HOME
    env["LANG"] = env["LC_ALL"] = "C.UTF-8"
    return env


def node_dir(node: dict) -> Path:
    return BASE / node["short"]


def node_env(node: dict) -> dict[str, str]:
    d = node_dir(node)
    env = base_env()
    env.update(
        RABBITMQ_NODENAME=node["name"],
        RABBITMQ_USE_LONGNAME="false",
        RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
        RABBITMQ_NODE_PORT=str(node["amqp"]),
        RABBITMQ_DIST_PORT=str(node["dist"]),
        RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
        RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
        RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
        RABBITMQ_LOG_BASE=str(d / "log"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
        RABBITMQ_PID_FILE=str(d / "rabbit.pid"),
        ERL_CRASH_DUMP=str(d / "log" / "erl_crash.dump"),  # not in rabbitmq's home
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
    )
    return env


def ctl(node: dict, *args: str, check: bool = True, timeout: float = 120) -> str:
    """Run rabbitmqctl against `node` (as rabbitmq, so it reads the shared cookie)."""
    cmd = as_rabbitmq([str(RABBIT_BIN / "rabbitmqctl"), "-n", node["name"], *args])
    p = subprocess.run(
        cmd, env=base_env(), cwd=RABBIT_HOME, capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} on {node['name']} failed:\n{p.stdout}{p.stderr}")
    return p.stdout


def port_free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as s:
            # As servers do: a port held only by TIME_WAIT connections is free to listen on.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def check_ports() -> None:
    ports = [n[k] for n in NODES for k in PORT_KEYS]
    assert len(set(ports)) == len(ports), "duplicate port in NODES"
    clash = sorted(set(ports) & RESERVED)
    busy = [p for p in ports if not port_free(p)]
    if clash or busy:
        sys.exit(f"ports not usable: reserved {clash}, in use {busy} (leftover nodes? run stop)")


def write_files(node: dict) -> None:
    d = node_dir(node)
    for sub in ("mnesia", "log"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "rabbitmq-env.conf").write_text("")
    (d / "enabled_plugins").write_text(PLUGINS)
    (d / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{node['amqp']}\n"
        f"management.tcp.port = {node['management']}\n"
        "management.tcp.ip = 127.0.0.1\n"
        f"prometheus.tcp.port = {node['prometheus']}\n"
        "prometheus.tcp.ip = 127.0.0.1\n"
        # guest stays loopback-only: every client here connects from 127.0.0.1
    )


def chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(RUN_AS)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


def launch(node: dict) -> None:
    server = RABBIT_BIN / "rabbitmq-server"
    shell = f"ulimit -n 20000 2>/dev/null || true; exec {server} -detached"
    with open(node_dir(node) / "log" / "startup.log", "ab") as out:
        subprocess.run(
            as_rabbitmq(["sh", "-c", shell]),
            env=node_env(node),
            cwd=RABBIT_HOME,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=60,
        )


def await_startup(node: dict) -> None:
    # await_startup fails at once ("not running at all") until the VM has registered with
    # epmd, a second or so after `rabbitmq-server -detached` returned: retry until then.
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            ctl(node, "await_startup", "--timeout", str(START_TIMEOUT), timeout=START_TIMEOUT + 30)
            return
        except RuntimeError:
            if time.monotonic() > deadline or not node_pids(node):
                raise
            time.sleep(0.5)


def join(followers: list[dict], leader: dict) -> None:
    """stop_app, reset, join_cluster leader, start_app on each follower.

    stop_app (~6 s on a fresh node), reset and start_app run on the followers in parallel;
    join_cluster, the step that changes the leader's cluster membership, one at a time.
    """

    def on_all(*args: str) -> None:
        t = time.monotonic()
        with ThreadPoolExecutor(len(followers)) as pool:
            list(pool.map(lambda node: ctl(node, *args), followers))
        steps.append(f"{args[0]} {time.monotonic() - t:.1f}")

    steps: list[str] = []
    on_all("stop_app")
    on_all("reset")
    t = time.monotonic()
    for node in followers:
        ctl(node, "join_cluster", leader["name"])
    steps.append(f"join_cluster {time.monotonic() - t:.1f}")
    on_all("start_app")
    names = ", ".join(n["name"] for n in followers)
    log(f"{names} joined {leader['name']}: " + ", ".join(steps) + " (s)")


def running_nodes() -> list[str]:
    status = json.loads(ctl(NODES[0], "cluster_status", "--formatter", "json"))
    return sorted(status["running_nodes"])


def start() -> dict[str, float]:
    if BASE.exists():
        sys.exit(f"{BASE} exists: a cluster is up or was left behind; run stop first")
    check_ports()
    t0 = time.monotonic()
    BASE.mkdir(parents=True)
    for node in NODES:
        write_files(node)
    chown_tree(BASE)
    with ThreadPoolExecutor(len(NODES)) as pool:
        list(pool.map(launch, NODES))
        list(pool.map(await_startup, NODES))
    t1 = time.monotonic()
    log(f"3 nodes started in {t1 - t0:.1f} s")
    join(NODES[1:], NODES[0])
    want = sorted(n["name"] for n in NODES)
    for _ in range(60):
        if running_nodes() == want:
            break
        time.sleep(0.5)
    else:
        raise RuntimeError(f"cluster incomplete: {running_nodes()}")
    t2 = time.monotonic()
    log(f"clustered in {t2 - t1:.1f} s (total {t2 - t0:.1f} s): running_nodes = {want}")
    for n in NODES:
        print(
            f"  {n['name']}: amqp://guest:guest@127.0.0.1:{n['amqp']}/  "
            f"management {n['management']}  prometheus {n['prometheus']}  dist {n['dist']}"
        )
    return {"start": t1 - t0, "cluster": t2 - t1}


def node_pids(node: dict) -> list[int]:
    """Pids of the beam.smp running `node`, found by its RABBITMQ_NODENAME."""
    marker = f"RABBITMQ_NODENAME={node['name']}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "exe").resolve().name.startswith("beam"):
                continue
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def stop_node(node: dict) -> None:
    if not node_pids(node):
        return
    try:
        ctl(node, "shutdown", check=False, timeout=60)  # waits for the VM to exit
    except subprocess.TimeoutExpired:
        pass
    for _ in range(50):
        pids = node_pids(node)
        if not pids:
            return
        time.sleep(0.1)
    for pid in pids:
        log(f"{node['name']} (pid {pid}) did not stop: SIGKILL")
        os.kill(pid, signal.SIGKILL)


def stop() -> float:
    t0 = time.monotonic()
    if BASE.exists() or any(node_pids(n) for n in NODES):
        with ThreadPoolExecutor(len(NODES)) as pool:
            list(pool.map(stop_node, NODES))
        shutil.rmtree(BASE, ignore_errors=True)
    elapsed = time.monotonic() - t0
    log(f"stopped and removed {BASE} in {elapsed:.1f} s")
    return elapsed


async def amqp_check() -> None:
    import aio_pika

    user = "guest"
    for node in NODES:
        url = f"amqp://{user}:{user}@127.0.0.1:{node['amqp']}/"
        try:
            conn = await aio_pika.connect(url, timeout=10)
        except aio_pika.exceptions.ProbableAuthenticationError:
            # guest refused (e.g. a broker with loopback_users for everything): add a user.
            user = "rk"
            ctl(NODES[0], "add_user", user, user, check=False)
            ctl(NODES[0], "set_user_tags", user, "administrator")
            ctl(NODES[0], "set_permissions", "-p", "/", user, ".*", ".*", ".*")
            url = f"amqp://{user}:{user}@127.0.0.1:{node['amqp']}/"
            conn = await aio_pika.connect(url, timeout=10)
        async with conn:
            channel = await conn.channel()
            name = f"local-cluster-probe-{node['short']}"
            queue = await channel.declare_queue(name, exclusive=True)
            await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=name)
            msg = await queue.get(timeout=5)
            await msg.ack()
            await queue.delete()
        log(f"{node['name']}: AMQP as {user} on {node['amqp']}: declare/publish/get/delete ok")


def dump_logs(lines: int = 15) -> None:
    for node in NODES:
        for f in sorted((node_dir(node) / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {f}", *tail, sep="\n", file=sys.stderr)


def start_or_clean() -> None:
    """`start`, but stop and remove whatever it started if it fails."""
    try:
        start()
    except BaseException:
        dump_logs()
        stop()
        raise


def check() -> None:
    t0 = time.monotonic()
    try:
        start()
        asyncio.run(amqp_check())
    except BaseException:
        dump_logs()
        raise
    finally:
        stop()
    log(f"check done in {time.monotonic() - t0:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", nargs="?", default="check", choices=["start", "stop", "check"])
    command = parser.parse_args().command
    {"start": start_or_clean, "stop": stop, "check": check}[command]()


if __name__ == "__main__":
    main()
