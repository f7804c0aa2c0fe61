"""Process isolation: what runs apart from our process, because it is untrusted or may not return.

    sandbox.py       run untrusted Python (model-generated code): namespaces, an unprivileged uid,
                     rlimits, a seccomp filter, the whole process tree killed at its time limit
    code_harness.py  the code task's judge, run inside the sandbox as its main.py
    verifier.py      math-verify in a worker process, with a time limit per answer

Model-generated code never runs in-process (docs/reward-hacking.md).
"""
