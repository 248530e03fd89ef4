# Probe, now a module: the three-node RabbitMQ cluster on localhost beside the local broker
# (issue 14) became rabbitkeys/tools/rabbit_cluster.py (RabbitCluster: start, stop, kill,
# restart, queue placement; the pitfalls this probe met are in its docstring), and the
# tests' rabbit_cluster / cluster fixtures (tests/conftest.py). What this probe did:
#
#   python -m rabbitkeys.tools.rabbit_cluster check                   # start, use, stop
#   python -m rabbitkeys.tools.rabbit_cluster start --port-base 5680  # leave it up
#   python -m rabbitkeys.tools.rabbit_cluster stop  --port-base 5680
#
# Node names changed: rk{i}-{port base}@localhost (was rk{i}@localhost), and the default
# directory is /tmp/rabbitkeys-cluster-{port base} (was /tmp/rabbitkeys-cluster).
import sys

from rabbitkeys.tools.rabbit_cluster import main

if __name__ == "__main__":
    sys.exit(main())
