"""Exception types the command line turns into one-line messages instead of tracebacks."""


class UserError(ValueError):
    """Bad input from the user; the CLI prints it as one line and exits 2."""


class StagePreempted(RuntimeError):
    """A stage stopped on request (SLURM's time-limit signal, preemption, scancel) after a complete
    checkpoint; `signum` is the signal that asked, where known.

    Nothing is wrong: running the stage again resumes where it stopped.
    """

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum
