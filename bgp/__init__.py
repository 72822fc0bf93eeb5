"""BGP through ExaBGP: its configuration (`config`), its API protocol (`api`), the
routing information base (`rib`), import policy (`policy`), who to peer with
(`peers`), and the adapter that runs the ExaBGP process (`speaker`, with `relay` as
the API process ExaBGP starts). Everything but `speaker` and `relay` is pure.
"""
