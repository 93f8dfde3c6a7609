"""Create or promote a superuser from the command line."""

from __future__ import annotations

from fastapi_users.password import PasswordHelper
from sqlalchemy import select

from atrium.config import Settings
from atrium.kit.db import create_engine, create_sessionmaker
from atrium.models import User


async def ensure_superuser(settings: Settings, email: str, password: str) -> bool:
    """Create a verified superuser, or promote the existing user; returns whether created."""
    engine = create_engine(settings.resolved_database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            email = email.strip().lower()
            user = (await session.execute(select(User).filter_by(email=email))).scalar_one_or_none()
            created = user is None
            if user is None:
                user = User(
                    email=email,
                    hashed_password=PasswordHelper().hash(password),
                    is_active=True,
                    is_verified=True,
                    is_superuser=True,
                )
                session.add(user)
            else:
                user.is_superuser = True
            await session.commit()
            return created
    finally:
        await engine.dispose()
