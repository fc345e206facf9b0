"""The embedded local stack: every real server ctloop needs, run as local processes."""

from ctloop.stack.components import StackError
from ctloop.stack.manager import ComponentStatus, LocalStack

__all__ = ["ComponentStatus", "LocalStack", "StackError"]
