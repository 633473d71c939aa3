# Copies the first half of the input memory to the second half, a byte at a time; r2 = length.
mov %r3, %r2
rsh %r3, 1              # half
mov %r4, 0              # i
loop:
jge %r4, %r3, done
mov %r5, %r1
add %r5, %r4
ldxb %r6, [%r5+0]
add %r5, %r3
stxb [%r5+0], %r6
add %r4, 1
ja loop
done:
mov %r0, %r4
exit
