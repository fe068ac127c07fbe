"""dhow's settings: one tree, one precedence (command line > environment > file > default).

Every field has a default and says what it is for (``fields``); ``dhow serve`` makes its options from the
fields (the text is the option's help). ``resolve_settings`` (``resolver``) is the only place that decides
which source wins, for every command: ``serve`` and the administration commands (``keys``, ``tenants``,
``audit``, ``models``, ``rollout``), which find the stores and name their actor the same way.
"""

from dhow.settings.fields import ANONYMOUS_ACTOR, CONFIG_FILE_HELP, ENV_PREFIX, ServerSettings, live_settings
from dhow.settings.resolver import (
    SettingOption,
    SettingsSource,
    resolve_settings,
    resolve_settings_and_sources,
    setting_options,
)

__all__ = [
    "ANONYMOUS_ACTOR",
    "CONFIG_FILE_HELP",
    "ENV_PREFIX",
    "ServerSettings",
    "SettingOption",
    "SettingsSource",
    "live_settings",
    "resolve_settings",
    "resolve_settings_and_sources",
    "setting_options",
]
