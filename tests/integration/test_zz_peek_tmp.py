from tests.integration.test_credential_modes import *
from tests.integration.test_credential_modes import emulator  # noqa
def test_peek(start, emulator):
    deny_all_token_creators(emulator.app.state.iam_app, TARGET_SA)
    sidecar = start(impersonate_config(emulator, delegates=[DELEGATE_1]), wait_ready=False)
    print(generate(sidecar).json())
    emulator.app.state.iam_app.state.token_creators.clear()
    emulator.app.state.iam_app.state.service_accounts = {TARGET_SA}
    time.sleep(0.1)
    print(generate(sidecar).json())
    print("\n".join(sidecar.stderr_lines[-3:]))
