"""fastapi-users wiring: the user database adapter and the user manager.

fastapi-users owns the user table, registration, verification and password reset tokens. Two
adjustments make it fit Atrium's unit of work:

* :class:`UserDatabase` flushes instead of committing: the request dependency commits once, after
  the route returns, so a registration and the tenant it creates land together or not at all.
* :class:`UserManager` sends mail by enqueueing the ``atrium.email.send`` task on the same
  session, so a mail leaves only once the change it announces is committed.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi_users import BaseUserManager, UUIDIDMixin, exceptions, schemas
from fastapi_users_db_sqlalchemy import SQLAlchemyUserDatabase
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from atrium.accounts.passwords import password_helper, password_problem
from atrium.config import Settings
from atrium.kit.db import DBSession
from atrium.kit.enqueue import enqueue
from atrium.models import User
from atrium.models.accounts import user_id_col

VERIFY_TOKEN_LIFETIME = 24 * 3600
RESET_TOKEN_LIFETIME = 3600


class UserDatabase(SQLAlchemyUserDatabase[User, uuid.UUID]):
    """The fastapi-users adapter, flushing rather than committing (the session owner commits)."""

    async def create(self, create_dict: dict[str, Any]) -> User:
        """Add a user and flush it so its id and defaults are known."""
        user = User(**create_dict)
        self.session.add(user)
        await self.session.flush()
        await self.session.refresh(user)  # the stored timestamps (MySQL keeps whole seconds)
        return user

    async def update(self, user: User, update_dict: dict[str, Any]) -> User:
        """Change attributes of ``user`` and flush."""
        for key, value in update_dict.items():
            setattr(user, key, value)
        self.session.add(user)
        await self.session.flush()
        return user

    async def delete(self, user: User) -> None:
        """Delete ``user`` (memberships, sessions and exports go with it through FKs)."""
        await self.session.execute(delete(User).where(user_id_col == user.id))
        self.session.expunge(user)


def link(settings: Settings, path: str, **params: str) -> str:
    """An absolute link for mail, on the public URL."""
    return f"{settings.resolved_public_url}{path}?{urlencode(params)}"


def send_mail(session: AsyncSession, template: str, to: str, context: dict[str, Any]) -> None:
    """Mail ``to`` once ``session`` commits (through the Celery mail task)."""
    enqueue(session, "atrium.email.send", template=template, to=[to], context=context)


class UserManager(UUIDIDMixin, BaseUserManager[User, uuid.UUID]):
    """fastapi-users' manager with Atrium's password rules, token secrets and mail."""

    reset_password_token_lifetime_seconds = RESET_TOKEN_LIFETIME
    verification_token_lifetime_seconds = VERIFY_TOKEN_LIFETIME

    def __init__(self, user_db: UserDatabase, settings: Settings) -> None:
        super().__init__(user_db, password_helper)
        self.settings = settings
        secret = settings.secret_key.get_secret_value()
        self.reset_password_token_secret = secret
        self.verification_token_secret = secret

    @property
    def session(self) -> AsyncSession:
        """The unit of work the manager writes to."""
        db: UserDatabase = self.user_db  # type: ignore[assignment]
        return db.session

    async def validate_password(self, password: str, user: schemas.UC | User) -> None:
        """Apply :func:`atrium.accounts.passwords.password_problem`."""
        problem = password_problem(password, getattr(user, "email", None))
        if problem is not None:
            raise exceptions.InvalidPasswordException(reason=problem[0])

    async def on_after_request_verify(
        self, user: User, token: str, request: Request | None = None
    ) -> None:
        """Mail the verification link."""
        send_mail(
            self.session,
            "verify_email",
            user.email,
            {
                "name": user.name or user.email,
                "link": link(self.settings, "/verify-email", token=token),
                "hours": VERIFY_TOKEN_LIFETIME // 3600,
            },
        )

    async def on_after_forgot_password(
        self, user: User, token: str, request: Request | None = None
    ) -> None:
        """Mail the password reset link."""
        send_mail(
            self.session,
            "reset_password",
            user.email,
            {
                "name": user.name or user.email,
                "link": link(self.settings, "/reset-password", token=token),
                "minutes": RESET_TOKEN_LIFETIME // 60,
            },
        )


def build_user_manager(session: AsyncSession, settings: Settings) -> UserManager:
    """A manager working in ``session``."""
    return UserManager(UserDatabase(session, User), settings)


async def get_user_db(session: DBSession) -> UserDatabase:
    """Dependency: the user adapter on the request's session.

    A plain function (not a generator): a yield dependency of request scope may not depend on
    :data:`DBSession`, whose scope is the endpoint function.
    """
    return UserDatabase(session, User)


async def get_user_manager(request: Request, session: DBSession) -> UserManager:
    """Dependency: the user manager on the request's session."""
    return build_user_manager(session, request.app.state.settings)
