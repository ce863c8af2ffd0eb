"""The command intake, piece by piece: who sent a command (`auth`), whether it can run
(`parse`), running it with its reply (`execute`), and the pipeline joining them (`pipeline`).
`shared.commands` re-exports what services use."""
