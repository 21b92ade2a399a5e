"""User profiles: what the pipeline knows about a user, and where it is stored."""

from hyperrec.profiles.model import Profile
from hyperrec.profiles.store import ProfileStore

__all__ = ["Profile", "ProfileStore"]
