# Sieve of Eratosthenes: counts the primes below N, where the input memory is N zeroed bytes
# (r1 = its address, r2 = N). Run it with: livebpf run examples/sieve.s --zeroed-mem 4096
mov %r0, 0              # primes found
mov %r3, 2              # candidate i
outer:
jge %r3, %r2, done
mov %r4, %r1
add %r4, %r3
ldxb %r5, [%r4+0]
jne %r5, 0, next        # marked: not prime
add %r0, 1
mov %r6, %r3
mul %r6, %r3            # j = i * i
inner:
jge %r6, %r2, next
mov %r4, %r1
add %r4, %r6
stb [%r4+0], 1          # mark j composite
add %r6, %r3
ja inner
next:
add %r3, 1
ja outer
done:
exit
