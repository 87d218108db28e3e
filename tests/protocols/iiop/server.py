"""IIOP test backend: an omniORB server whose Demo::Greeter::echo answers with
the server's name and the message. The object has the fixed INS object key
"Greeter", so a corbaloc URL reaches it without an IOR.

usage: server.py NAME HOST PORT"""
import sys

from omniORB import CORBA
import Demo__POA

name, host, port = sys.argv[1], sys.argv[2], sys.argv[3]


class Greeter(Demo__POA.Greeter):
    def echo(self, message):
        return f"{name}: {message}"


orb = CORBA.ORB_init(["-ORBendPoint", f"giop:tcp:{host}:{port}"], CORBA.ORB_ID)
ins_poa = orb.resolve_initial_references("omniINSPOA")
ins_poa.activate_object_with_id(b"Greeter", Greeter())
ins_poa._get_the_POAManager().activate()
orb.run()
