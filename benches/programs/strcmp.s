# Compares the two halves of the input memory as NUL-terminated strings; r2 = length.
# Returns the difference of the first differing bytes (0 when equal).
mov %r3, %r2
rsh %r3, 1
mov %r4, %r1            # a
mov %r5, %r1
add %r5, %r3            # b
mov %r0, 0
loop:
ldxb %r6, [%r4+0]
ldxb %r7, [%r5+0]
jne %r6, %r7, differ
jeq %r6, 0, done
add %r4, 1
add %r5, 1
ja loop
differ:
mov %r0, %r6
sub %r0, %r7
done:
exit
