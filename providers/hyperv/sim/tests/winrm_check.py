#!/usr/bin/env python3
"""Talks to the Hyper-V simulator with pywinrm, a WS-Management client that
is not ours: pywinrm builds the envelope headers (Protocol.build_wsman_header)
and frames the HTTP exchange (Basic over HTTPS, and NTLM under Negotiate);
this script adds the
selectors and bodies WIRE.md uses, and checks that every reply parses, echoes
the MessageID, and that faults and a bad password come back the way pywinrm
understands them.

Usage: winrm_check.py ENDPOINT USER PASSWORD
Prints "winrm-check: ok" and exits 0 when every check passed.
"""

import sys
import time
import uuid
import xml.etree.ElementTree as ET

import xmltodict
from winrm.exceptions import InvalidCredentialsError, WSManFaultError
from winrm.protocol import Protocol

V2 = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/"
NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "n": "http://schemas.xmlsoap.org/ws/2004/09/enumeration",
}
GET = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Get"
ENUMERATE = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Enumerate"
PULL = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Pull"
VSMS = "Msvm_VirtualSystemManagementService"


def fail(msg):
    print("winrm-check: FAILED: " + msg)
    sys.exit(1)


def send(p, action, uri, selectors=None, body=None):
    """Sends one request; returns the parsed reply root."""
    message_id = uuid.uuid4()
    env = p.build_wsman_header(action, uri, message_id=message_id)
    if selectors:
        env["env:Header"]["w:SelectorSet"] = {
            "w:Selector": [{"@Name": k, "#text": v} for k, v in selectors]
        }
    env["env:Body"] = body or {}
    reply = p.send_message(xmltodict.unparse({"env:Envelope": env}))
    root = ET.fromstring(reply)
    relates = root.find("s:Header/a:RelatesTo", NS)
    if relates is None or relates.text != "uuid:{0}".format(message_id):
        fail("RelatesTo does not echo the MessageID: " + str(reply[:300]))
    got = root.find("s:Header/a:Action", NS)
    if got is None or got.text != action + "Response":
        fail("the reply action is not {0}Response".format(action))
    return root


def main():
    endpoint, user, password = sys.argv[1:4]
    p = Protocol(
        endpoint,
        transport="basic",
        username=user,
        password=password,
        server_cert_validation="ignore",
        read_timeout_sec=30,
        operation_timeout_sec=20,
    )

    # Get a service by CreationClassName alone (WIRE.md).
    root = send(p, GET, V2 + VSMS, [("CreationClassName", VSMS)])
    svc = root.find("s:Body/{%s}%s" % (V2 + VSMS, VSMS), NS)
    if svc is None:
        fail("no service instance in the Get reply")
    name = svc.find("{%s}Name" % (V2 + VSMS))
    if name is None or name.text != "vmms":
        fail("the service's Name is not vmms")

    # WQL enumeration with OptimizeEnumeration, then Pull to the end.
    body = {
        "n:Enumerate": {
            "w:OptimizeEnumeration": None,
            "w:MaxElements": "1",
            "w:Filter": {
                "@Dialect": "http://schemas.microsoft.com/wbem/wsman/1/WQL",
                "#text": "SELECT * FROM Msvm_ComputerSystem",
            },
        }
    }
    root = send(p, ENUMERATE, V2 + "*", body=body)
    items = list(root.find("s:Body/n:EnumerateResponse/w:Items", NS))
    ctx = root.find("s:Body/n:EnumerateResponse/n:EnumerationContext", NS)
    done = root.find("s:Body/n:EnumerateResponse/w:EndOfSequence", NS) is not None
    while not done:
        body = {
            "n:Pull": {
                "n:EnumerationContext": ctx.text,
                "n:MaxElements": "1",
            }
        }
        root = send(p, PULL, V2 + "*", body=body)
        items += list(root.find("s:Body/n:PullResponse/n:Items", NS))
        ctx = root.find("s:Body/n:PullResponse/n:EnumerationContext", NS)
        done = root.find("s:Body/n:PullResponse/n:EndOfSequence", NS) is not None
    captions = [i.find("{%sMsvm_ComputerSystem}Caption" % V2).text for i in items]
    if "Hosting Computer System" not in captions:
        fail("the host is not among the computer systems: %r" % captions)

    # Invoke DefineSystem with an embedded CIM-XML instance; follow the job.
    instance = (
        '<INSTANCE CLASSNAME="Msvm_VirtualSystemSettingData">'
        '<PROPERTY NAME="ElementName" TYPE="string"><VALUE>hcp-pywinrm</VALUE></PROPERTY>'
        '<PROPERTY NAME="VirtualSystemSubType" TYPE="string"><VALUE>Microsoft:Hyper-V:SubType:2</VALUE></PROPERTY>'
        "</INSTANCE>"
    )
    uri = V2 + VSMS
    body = {"p:DefineSystem_INPUT": {"@xmlns:p": uri, "p:SystemSettings": instance}}
    root = send(p, uri + "/DefineSystem", uri, [("CreationClassName", VSMS)], body)
    out = root.find("s:Body/{%s}DefineSystem_OUTPUT" % uri, NS)
    if out is None or out.find("{%s}ReturnValue" % uri).text != "4096":
        fail("DefineSystem did not start a job")
    job = out.find("{%s}Job/a:ReferenceParameters/w:SelectorSet/w:Selector[@Name='InstanceID']" % uri, NS)
    if job is None:
        fail("no Job reference in the DefineSystem reply")
    deadline = time.time() + 10
    while True:
        root = send(p, GET, V2 + "Msvm_ConcreteJob", [("InstanceID", job.text)])
        state = root.find("s:Body/{%sMsvm_ConcreteJob}Msvm_ConcreteJob/{%sMsvm_ConcreteJob}JobState" % (V2, V2), NS)
        if state.text == "7":
            break
        if state.text not in ("3", "4") or time.time() > deadline:
            fail("the DefineSystem job ended in state " + state.text)
        time.sleep(0.01)

    # A fault, as pywinrm parses it.
    try:
        send(p, GET, V2 + "Msvm_ComputerSystem", [("Name", "nothing")])
        fail("a Get without CreationClassName was accepted")
    except WSManFaultError as e:
        if e.code != 500 or e.fault_code != "s:Sender" or e.fault_subcode != "w:InvalidSelectors":
            fail("unexpected fault %r %r %r" % (e.code, e.fault_code, e.fault_subcode))
        if e.wsman_fault_code is None:
            fail("the fault has no WSManFault Code")

    # A wrong password.
    bad = Protocol(endpoint, transport="basic", username=user, password=password + "x", server_cert_validation="ignore")
    try:
        send(bad, GET, V2 + VSMS, [("CreationClassName", VSMS)])
        fail("a wrong password was accepted")
    except InvalidCredentialsError:
        pass

    # NTLM under Negotiate (pywinrm's "ntlm" transport: requests_ntlm and
    # pyspnego, over HTTPS without message encryption): a Get, then a
    # wrong password.
    ntlm = Protocol(
        endpoint,
        transport="ntlm",
        username=user,
        password=password,
        server_cert_validation="ignore",
        message_encryption="never",
    )
    root = send(ntlm, GET, V2 + VSMS, [("CreationClassName", VSMS)])
    if root.find("s:Body/{%s}%s" % (V2 + VSMS, VSMS), NS) is None:
        fail("no service instance in the Get reply under NTLM")
    bad = Protocol(
        endpoint,
        transport="ntlm",
        username=user,
        password=password + "x",
        server_cert_validation="ignore",
        message_encryption="never",
    )
    try:
        send(bad, GET, V2 + VSMS, [("CreationClassName", VSMS)])
        fail("a wrong password was accepted under NTLM")
    except InvalidCredentialsError:
        pass

    print("winrm-check: ok")


if __name__ == "__main__":
    main()
