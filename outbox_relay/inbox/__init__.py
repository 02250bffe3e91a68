"""The consumer's half of exactly-once effects: an inbox in the consumer's database.

Being built (issue 10, part 3): see README, "End to end: exactly-once effects".
"""
