"""One msrun process of a job started by msrun_launcher.sh: run the command, then end the log with its exit code.

msrun starts ``python msrun_worker.py SCRIPT ARGS...`` in each process, with that process's log as
stdout. A worker runs ``python SCRIPT ARGS...`` as its child (SIGINT/SIGTERM are passed on) and
prints ``[msrun_launcher] exit code N`` last, N = 128 + the signal if the child was killed: msrun
itself only reports that some worker failed, and the launcher reads this line to return the job's
exit code and show the failing worker's log. The scheduler process (``MS_ROLE=MS_SCHED``) simply
becomes the command.
"""
import os
import signal
import subprocess
import sys

EXIT_LINE = "[msrun_launcher] exit code"


def main() -> int:
    command = [sys.executable, *sys.argv[1:]]
    if os.environ.get("MS_ROLE") == "MS_SCHED":
        os.execv(sys.executable, command)
    child = subprocess.Popen(command)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda received, _frame: child.send_signal(received))
    code = child.wait()
    code = 128 - code if code < 0 else code
    print(f"{EXIT_LINE} {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
