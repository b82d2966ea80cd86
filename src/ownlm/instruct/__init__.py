"""Instruction data for supervised fine-tuning.

`formats` converts the seed's `{instruction, input, output}` records and OpenAI-style chats into one
chat shape and validates them; `tasks` generates verifiable tasks (known answers, a checker) and
calculator tool-use conversations; `sources` reads real instruction data installed by package name;
`stage` writes the `instruct` artifact (train/val/test chats, tool schemas, manifest).
"""
