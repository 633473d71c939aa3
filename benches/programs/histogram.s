# Counts the input's bytes into 64 stack buckets (byte & 63), then returns the sum of the squared
# counts; r1 = input, r2 = its length. The bucket accesses are proven inside the frame (the index
# is masked), so checked code runs them without a bounds test; the input reads keep theirs.
# The buckets start at zero on every engine (rbpf's JIT does not clear its stack).
mov %r3, 0
clear:
jge %r3, 64, count
mov %r6, %r3
lsh %r6, 3
mov %r4, %r10
add %r4, -512
add %r4, %r6
stdw [%r4+0], 0
add %r3, 1
ja clear
count:
mov %r3, 0
loop:
jge %r3, %r2, tally
mov %r4, %r1
add %r4, %r3
ldxb %r5, [%r4+0]
and %r5, 63
lsh %r5, 3
mov %r6, %r10
add %r6, -512
add %r6, %r5
ldxdw %r7, [%r6+0]
add %r7, 1
stxdw [%r6+0], %r7
add %r3, 1
ja loop
tally:
mov %r0, 0
mov %r3, 0
sum:
jge %r3, 64, done
mov %r6, %r3
lsh %r6, 3
mov %r4, %r10
add %r4, -512
add %r4, %r6
ldxdw %r7, [%r4+0]
mul %r7, %r7
add %r0, %r7
add %r3, 1
ja sum
done:
exit
