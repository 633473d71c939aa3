# fentry tracer for examples/trace/target.s. It runs before the target; `livebpf trace` counts
# its runs. r1 points at six u64s: the target's r1..r5, then its return value (still 0 here);
# r2 is the link's cookie (trace passes the cycle number). The result of an fentry is ignored.
ldxdw %r3, [%r1+0]              # the target's r1: address of its input
ldxdw %r4, [%r1+8]              # the target's r2: its length
ldxdw %r5, [%r1+40]             # no return value yet
mov %r0, 0
jeq %r4, 0, out                 # an empty input has no address
jne %r3, 0, out
mov %r0, 1                      # a length without an address: the arguments are wrong
out:
exit
