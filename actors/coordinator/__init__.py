"""The coordinator actor: the host's brain. It owns the run state, the
migration state machine, its parameters and capabilities, the rate limiter and
convergence decision, the completion phase with the guest stopped, and the
event PUB socket. Started as `python -P -m livemig.actors.coordinator`.

state     the migration's state and statistics (query-migrate)
options   migration parameters and capabilities
commands  the QMP commands (the monitor imports their table from here)
faults    fault injection (x-fault)
outgoing  the outgoing migration: setup, iterations, completion, undo
incoming  the incoming migration: listen, load, start the guest
control   the Coordinator itself and its control loop"""
