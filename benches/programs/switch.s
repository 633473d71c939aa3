# A switch on i % 8 inside a loop of r2 iterations, compiled the way a C switch becomes a chain
# of compares; returns a checksum.
mov %r0, 0
mov %r3, 0              # i
loop:
jge %r3, %r2, done
mov %r4, %r3
and %r4, 7
jeq %r4, 0, case0
jeq %r4, 1, case1
jeq %r4, 2, case2
jeq %r4, 3, case3
jeq %r4, 4, case4
jeq %r4, 5, case5
jeq %r4, 6, case6
xor %r0, %r3
ja next
case0:
add %r0, 1
ja next
case1:
mul %r0, 3
ja next
case2:
sub %r0, %r3
ja next
case3:
lsh %r0, 1
ja next
case4:
rsh %r0, 1
ja next
case5:
or %r0, 0x55
ja next
case6:
add %r0, %r3
next:
add %r3, 1
ja loop
done:
exit
