"""Tracepipe: the local stack, its migrate command and the operator CLI."""
