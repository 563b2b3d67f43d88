"""`livemig bench` (= `scripts/bench`): how fast livemig moves memory and how
short the pause is, measured against the physical limits of this machine in
the same run. Every target is a ratio of two figures taken side by side,
because absolute numbers drift on shared machines.

Scenarios (see docs/performance.md):
  1 baseline   plain socket sender and receiver processes over tcp and unix
  2 stopped    1 GiB incompressible RAM, bandwidth unlimited, tcp and unix
  3 zero       the same with all-zero and half-zero RAM
  4 running    memtouch dirtying at 0/25/50 % of the bandwidth limit, downtime
               limits 300 ms and 30 ms
  5 scaling    stopped guests of 256 MiB .. 2 GiB: time, CPU, private memory
  6 qcow2      the block layer's qcow2 driver against qemu-img bench
  9 multifd    stopped 1 GiB guest over tcp, no multifd and 1/2/4 channels, against
               the raw baseline; zlib/zstd/none on half-zero and text RAM
`--quick` runs scenarios 1 and 2 over tcp only and prints the throughput
ratio as its last line.

Every host is a real `livemig host` process tree (tools/launch.py)
on loopback, stopped for sure afterwards; every wait has a timeout.

Modules: baseline (scenario 1), migrate (one measured migration), accounting
(CPU and memory from /proc), scenarios (2-6), targets, report (tables and
plots), cli (`run_bench`), qcow2 (the driver against qemu-img bench).
"""
