# Collatz: total steps for the starting values 1 .. r2/16 to reach 1; no memory accesses,
# so the engines differ only in ALU, branch and register code.
mov %r0, 0
rsh %r2, 4
mov %r3, 1              # start value
outer:
jgt %r3, %r2, done
mov %r4, %r3
inner:
jeq %r4, 1, next
add %r0, 1
mov %r5, %r4
and %r5, 1
jeq %r5, 0, even
mul %r4, 3
add %r4, 1
ja inner
even:
rsh %r4, 1
ja inner
next:
add %r3, 1
ja outer
done:
exit
