"""The differential fault-injection harness (issue 8): stock MLflow vs bridge, same program, compared.

programs.py    Hypothesis rules (the calls a user makes, fault events) and the model that keeps them valid
executor.py    runs a program in one world, records reads and errors
faults.py      the oracle world and the bridge world with its faults (flaky proxy, Link's fault transport, …)
child.py       a program in a child process: kill -9, or exit over a slow link, then `bridge sync`
oracle.py      captures a server's state for a program and compares two
allowances.py  everything not compared, and rules kept off by known defects — the one place
harness.py     two servers, a proxy, `check(program)`, `run_seed(...)`
arrivals.py    the file rules' way in: bridge's entrance, recording what reached it and when
orders.py      the file rules: the file lane's orders checked from those arrivals
"""
