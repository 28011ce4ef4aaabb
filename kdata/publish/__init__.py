"""Publishing: the Hub-layout folder with its dataset card, and the push to the Hub."""

from kdata.publish.config import PublishConfig
from kdata.publish.folder import write_folder
from kdata.publish.hub import PushResult, push

__all__ = ["PublishConfig", "PushResult", "push", "write_folder"]
