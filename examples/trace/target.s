# FNV-1a (64-bit) hash of the input memory (r1 = its address, r2 = its length); r0 = the hash.
# The target `livebpf trace` runs in many threads while it attaches and detaches tracers:
#   livebpf trace examples/trace/target.s --fentry examples/trace/count_entry.s \
#       --fexit examples/trace/count_exit.s --zeroed-mem 256
# On its own: livebpf run examples/trace/target.s --mem "68 65 6c 6c 6f"   # "hello": 0xa430d84680aabd0b
lddw %r0, 0xcbf29ce484222325    # FNV offset basis
lddw %r3, 0x100000001b3         # FNV prime
mov %r4, %r1                    # cursor
add %r2, %r1                    # end of the input
loop:
jge %r4, %r2, done
ldxb %r5, [%r4+0]
xor %r0, %r5                    # hash ^= byte
mul %r0, %r3                    # hash *= prime
add %r4, 1
ja loop
done:
exit
