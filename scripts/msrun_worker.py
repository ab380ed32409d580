"""One msrun process of a job started by msrun_launcher.sh: run the command, then end the log with its exit code.

msrun starts ``python msrun_worker.py SCRIPT ARGS...`` in each process, with that process's log as
stdout. A worker runs ``python SCRIPT ARGS...`` as its child (SIGINT/SIGTERM are passed on) and
prints ``[msrun_launcher] exit code N`` last, N = 128 + the signal if the child was killed: msrun
itself only reports that some worker failed, and the launcher reads this line to return the job's
exit code and show the failing worker's log. A child that was passed a signal and ends with 128 +
that signal (it stopped as asked: mindport train after its checkpoint) is reported to msrun as a
success: at a worker's non-zero exit msrun SIGKILLs the others, which may still be saving, and its
scheduler then waits ~30 s for the killed ranks' heartbeats. The scheduler process
(``MS_ROLE=MS_SCHED``) simply becomes the command.
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
    passed_on = []  # the signals passed to the child

    def pass_on(received: int, _frame) -> None:
        passed_on.append(received)
        child.send_signal(received)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, pass_on)
    code = child.wait()
    code = 128 - code if code < 0 else code
    print(f"{EXIT_LINE} {code}", flush=True)
    stopped_as_asked = any(code == 128 + sig for sig in passed_on)
    return 0 if stopped_as_asked else code


if __name__ == "__main__":
    sys.exit(main())
